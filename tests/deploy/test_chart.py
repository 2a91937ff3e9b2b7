"""The factkeeper Helm chart (and the local Kafka cluster chart): lint, schema and structure.

Every environment's render goes through ``helm lint --strict`` and offline ``kubeconform
-strict`` against the schemas vendored in ``deploy/schemas`` (closed, so a misspelt field
fails). The structural tests pin what the daemon relies on: a single writer (one replica,
Recreate), a read-only non-root container, probes on /healthz and /readyz, secrets only by
reference, and a GPU in limits only when asked for.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import load_settings
from tests.deploy.conftest import (
    CHART,
    ENVIRONMENTS,
    KAFKA_CHART,
    SCHEMAS,
    TOOLS_TEST_TIMEOUT_S,
    Tools,
    chart_values,
    find,
    kafka_values,
    only,
    parse_manifests,
)

pytestmark = pytest.mark.timeout(TOOLS_TEST_TIMEOUT_S)

GPU = "nvidia.com/gpu"
HOME = "/var/lib/factkeeper"
METRICS_PORT = 9108
#: Every optional resource switched on, with the train-editor as a one-off Job.
ALL_ON = (
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "trainEditor.enabled=true",
    "gpu.enabled=true",
    "secrets.kafkaSaslPassword.existingSecret=kafka-user",
    "secrets.adminToken.existingSecret=admin",
    "podDisruptionBudget.enabled=true",
)


def daemon_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def daemon_claim(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The state volume's claim (the train-editor job has its own)."""
    (claim,) = [
        c
        for c in find(docs, "PersistentVolumeClaim")
        if c["metadata"]["labels"].get("app.kubernetes.io/component") != "train-editor"
    ]
    return claim


def all_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Containers of the Deployment, Jobs and CronJobs."""
    specs = [d["spec"]["template"]["spec"] for d in find(docs, "Deployment") + find(docs, "Job")]
    specs += [d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in find(docs, "CronJob")]
    return [container for spec in specs for container in spec["containers"]]


def assert_all_valid(report: dict[str, Any], expected_kinds: set[str]) -> None:
    """Every resource validated (none skipped for want of a schema) and the kinds expected."""
    summary = report["summary"]
    problems = [r for r in report["resources"] if r["status"] != "statusValid"]
    assert not problems, problems
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0, summary
    assert {r["kind"] for r in report["resources"]} == expected_kinds


# --- lint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_helm_lint_factkeeper_chart(tools: Tools, env: str | None) -> None:
    values = ["--values", str(chart_values(env))] if env else []
    proc = tools.run("helm", "lint", "--strict", str(CHART), *values)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_helm_lint_kafka_cluster_chart(tools: Tools, env: str | None) -> None:
    values = ["--values", str(kafka_values(env))] if env else []
    proc = tools.run("helm", "lint", "--strict", str(KAFKA_CHART), *values)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


# --- kubeconform ----------------------------------------------------------------------------

BASE_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "Deployment",
    "NetworkPolicy",
}


@pytest.mark.parametrize(
    ("env", "kinds"),
    [
        ("dev", BASE_KINDS),
        ("prod", BASE_KINDS | {"CronJob", "ServiceMonitor", "PrometheusRule"}),
    ],
)
def test_environment_render_passes_kubeconform(tools: Tools, env: str, kinds: set[str]) -> None:
    manifests = tools.template(values=[chart_values(env)]).stdout
    assert_all_valid(tools.kubeconform(manifests), kinds)


def test_every_optional_resource_passes_kubeconform(tools: Tools) -> None:
    manifests = tools.template(sets=ALL_ON).stdout
    assert_all_valid(
        tools.kubeconform(manifests),
        BASE_KINDS | {"Job", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget"},
    )


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_kafka_cluster_render_passes_kubeconform(tools: Tools, env: str) -> None:
    manifests = tools.template(KAFKA_CHART, values=[kafka_values(env)], release="kafka").stdout
    assert_all_valid(
        tools.kubeconform(manifests), {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
    )


def _all_kinds_render(tools: Tools) -> list[dict[str, Any]]:
    docs = tools.render(sets=ALL_ON)
    docs += tools.render(values=[chart_values("prod")])  # the CronJob
    docs += parse_manifests(
        tools.template(KAFKA_CHART, values=[kafka_values("prod")], release="kafka").stdout
    )
    return docs


def test_every_vendored_schema_is_used(tools: Tools) -> None:
    """One schema per rendered kind (besides the shared definitions): none missing, none stale."""
    docs = _all_kinds_render(tools)
    rendered = set()
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        kind = doc["kind"].lower()
        if group.endswith(".k8s.io"):  # built-in API groups (networking.k8s.io)
            rendered.add(f"kubernetes/{kind}-{group.split('.')[0]}-{version}.json")
        elif group and "." in group:
            rendered.add(f"crds/{group}/{kind}_{version}.json")
        else:
            suffix = f"-{group}-{version}" if group else f"-{version}"
            rendered.add(f"kubernetes/{kind}{suffix}.json")
    vendored = {
        str(path.relative_to(SCHEMAS))
        for path in SCHEMAS.rglob("*.json")
        if not path.name.startswith("_")
    }
    assert vendored == rendered


def test_kubeconform_rejects_unknown_and_mistyped_fields(tools: Tools) -> None:
    """The vendored schemas are closed: a stray field in any rendered kind is an error."""
    docs = _all_kinds_render(tools)
    broken = []
    for doc in {d["kind"]: d for d in docs}.values():
        doc = copy.deepcopy(doc)
        target = doc.get("spec", doc)
        target["notAField"] = True
        broken.append(doc)
    deployment = copy.deepcopy(find(docs, "Deployment")[0])
    deployment["spec"]["replicas"] = "one"
    deployment["metadata"]["name"] = "mistyped-replicas"
    broken.append(deployment)
    container = copy.deepcopy(find(docs, "Deployment")[0])
    container["metadata"]["name"] = "misspelt-probe"
    (spec,) = container["spec"]["template"]["spec"]["containers"]
    spec["readinesProbe"] = spec.pop("readinessProbe")
    broken.append(container)

    report = tools.kubeconform(yaml.safe_dump_all(broken))
    statuses = {(r["kind"], r["name"]): r["status"] for r in report["resources"]}
    assert len(statuses) == len(broken)
    assert set(statuses.values()) == {"statusInvalid"}, statuses


# --- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_single_writer_deployment(tools: Tools, env: str) -> None:
    deployment = only(tools.render(values=[chart_values(env)]), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 120


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_container_command_env_and_volumes(tools: Tools, env: str) -> None:
    docs = tools.render(values=[chart_values(env)])
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    container = daemon_container(docs)
    assert container["command"] == [
        "factkeeper",
        "run",
        "--config",
        "/etc/factkeeper/config.yaml",
    ]
    env_vars = {e["name"]: e for e in container["env"]}
    assert env_vars["FACTKEEPER_HOME"]["value"] == HOME
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[HOME]]["persistentVolumeClaim"]["claimName"]
    assert claim == daemon_claim(docs)["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    config_map = volumes[mounts["/etc/factkeeper"]]["configMap"]["name"]
    assert config_map == only(docs, "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_hardened_security_context(tools: Tools, env: str) -> None:
    docs = tools.render(values=[chart_values(env)])
    pod_context = only(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] == 10001
    assert pod_context["fsGroup"] == 10001
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers(docs):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["runAsNonRoot"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_probes_and_metrics_service(tools: Tools, env: str) -> None:
    docs = tools.render(values=[chart_values(env)])
    container = daemon_container(docs)
    assert container["ports"] == [
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    ]
    probes = {name: container[f"{name}Probe"]["httpGet"] for name in ("liveness", "readiness")}
    assert probes["liveness"] == {"path": "/healthz", "port": "metrics"}
    assert probes["readiness"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    service = only(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_secrets_only_by_reference(tools: Tools, env: str) -> None:
    docs = tools.render(values=[chart_values(env)])
    assert not find(docs, "Secret")
    env_vars = {e["name"]: e for e in daemon_container(docs)["env"]}
    secret_vars = ("FACTKEEPER_KAFKA__SASL_PASSWORD", "FACTKEEPER_ADMIN__TOKEN")
    present = [name for name in secret_vars if name in env_vars]
    assert "FACTKEEPER_KAFKA__SASL_PASSWORD" in present
    assert ("FACTKEEPER_ADMIN__TOKEN" in present) == (env == "prod")
    for name in present:
        assert "value" not in env_vars[name]
        assert set(env_vars[name]["valueFrom"]["secretKeyRef"]) == {"name", "key"}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_prod_verifies_kafka_tls_with_the_mounted_cluster_ca(tools: Tools, env: str) -> None:
    docs = tools.render(values=[chart_values(env)])
    container = daemon_container(docs)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    config = yaml.safe_load(only(docs, "ConfigMap")["data"]["config.yaml"])
    env_vars = {e["name"]: e for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    if env != "prod":
        assert "kafka-ca" not in volumes and "FACTKEEPER_KAFKA__SSL_CAFILE" not in env_vars
        return
    assert config["kafka"]["security_protocol"] == "SASL_SSL"
    assert volumes["kafka-ca"]["secret"]["secretName"] == "factkeeper-cluster-ca-cert"
    assert mounts["kafka-ca"] == {
        "name": "kafka-ca",
        "mountPath": "/etc/factkeeper/kafka-ca",
        "readOnly": True,
    }
    assert env_vars["FACTKEEPER_KAFKA__SSL_CAFILE"]["value"] == "/etc/factkeeper/kafka-ca/ca.crt"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_rendered_config_loads_in_the_daemon(tools: Tools, env: str, tmp_path: Path) -> None:
    """The ConfigMap's config.yaml, with the pod's environment, passes daemon/config.py."""
    docs = tools.render(values=[chart_values(env)])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(only(docs, "ConfigMap")["data"]["config.yaml"])
    pod_env = {"FACTKEEPER_HOME": str(tmp_path)}
    for var in daemon_container(docs)["env"]:
        if "valueFrom" in var:  # what the referenced Secret would hold
            pod_env[var["name"]] = (var["name"].lower() + "-secret-value").rjust(32, "s")
    settings = load_settings(config_file, env=pod_env)
    if env == "prod":  # control records must be signed: prod gets its key from its own Secret
        assert list(settings.control.keys) == ["k1"] and not settings.control.allow_unsigned
    assert settings.metrics.port == METRICS_PORT
    assert settings.metrics.host == "0.0.0.0"
    assert settings.journal.path == tmp_path / "state" / "journal.sqlite3"


def test_gpu_only_in_limits_and_only_when_enabled(tools: Tools) -> None:
    for docs, wanted in (
        (tools.render(values=[chart_values("dev")]), False),
        (tools.render(sets=["gpu.enabled=false"]), False),
        (tools.render(values=[chart_values("prod")]), True),
        (tools.render(sets=["gpu.enabled=true", "gpu.count=2"]), True),
    ):
        pod = only(docs, "Deployment")["spec"]["template"]["spec"]
        resources = daemon_container(docs)["resources"]
        assert GPU not in resources.get("requests", {})
        if wanted:
            assert resources["limits"][GPU] >= 1
            assert any(t.get("key") == GPU for t in pod["tolerations"])
        else:
            assert GPU not in resources.get("limits", {})
            assert "tolerations" not in pod
            assert "runtimeClassName" not in pod
    prod_pod = only(tools.render(values=[chart_values("prod")]), "Deployment")["spec"]["template"]
    assert prod_pod["spec"]["runtimeClassName"] == "nvidia"


def test_gpu_in_requests_is_refused(tools: Tools) -> None:
    proc = tools.template(sets=["resources.requests.nvidia\\.com/gpu=1"], check=False)
    assert proc.returncode != 0
    assert "not in resources.requests" in proc.stderr


def test_unknown_config_section_is_refused(tools: Tools) -> None:
    proc = tools.template(sets=["config.kafak.group_id=x"], check=False)
    assert proc.returncode != 0
    assert "kafak" in proc.stderr


def test_monitoring_resources_carry_the_prometheus_release_label(tools: Tools) -> None:
    docs = tools.render(sets=[*ALL_ON, "monitoring.prometheusRelease=kps"])
    monitor = only(docs, "ServiceMonitor")
    rule = only(docs, "PrometheusRule")
    for resource in (monitor, rule):
        assert resource["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    service_labels = only(docs, "Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert service_labels[monitor["spec"]["jobLabel"]] == "factkeeper"
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    unlabelled = tools.render(sets=[*ALL_ON, "monitoring.prometheusRelease="])
    assert "release" not in only(unlabelled, "ServiceMonitor")["metadata"]["labels"]


def test_rendered_prometheus_rule_passes_promtool(tools: Tools, tmp_path: Path) -> None:
    """The rules survive Helm's YAML round trip (multi-line exprs, template annotations)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: `make test` installs Debian's prometheus package")
    rule = only(tools.render(values=[chart_values("prod")]), "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_monitoring_resources_off_by_default(tools: Tools) -> None:
    for docs in (tools.render(), tools.render(values=[chart_values("dev")])):
        assert not find(docs, "ServiceMonitor")
        assert not find(docs, "PrometheusRule")


def test_train_editor_job_and_cronjob(tools: Tools) -> None:
    job = only(tools.render(sets=["trainEditor.enabled=true", "trainEditor.runId=7"]), "Job")
    assert job["metadata"]["name"].endswith("-7")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "factkeeper",
        "train-editor",
        "--model",
        "smollm2",
        "--dataset",
        "counterfact",
        "--device",
        "cuda",
    ]
    assert container["resources"]["limits"][GPU] == 1
    assert GPU not in container["resources"]["requests"]
    # The job has its own ReadWriteOnce claim, never the daemon's ReadWriteOncePod one; the
    # daemon mounts its editors/ read-only, so the job lands on the daemon's node. It gets no
    # Kafka or admin credentials.
    docs = tools.render(sets=["trainEditor.enabled=true", "trainEditor.runId=7"])
    (job_claim,) = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    state_claim = daemon_claim(docs)
    assert job_claim != state_claim["metadata"]["name"]
    assert state_claim["spec"]["accessModes"] == ["ReadWriteOncePod"]
    editor_claims = [
        c for c in find(docs, "PersistentVolumeClaim") if c["metadata"]["name"] == job_claim
    ]
    assert editor_claims[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    daemon_pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (editors,) = [m for m in daemon_container(docs)["volumeMounts"] if m["name"] == "editors"]
    assert editors == {
        "name": "editors",
        "mountPath": f"{HOME}/editors",
        "subPath": "editors",
        "readOnly": True,
    }
    daemon_volumes = {v["name"]: v for v in daemon_pod["volumes"]}
    assert daemon_volumes["editors"]["persistentVolumeClaim"]["claimName"] == job_claim
    job_home = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[HOME]
    assert {v["name"]: v for v in pod["volumes"]}[job_home]["persistentVolumeClaim"]
    (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "daemon"
    assert all("valueFrom" not in var for var in container["env"])
    cron = only(tools.render(values=[chart_values("prod")]), "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert not find(tools.render(), "Job") and not find(tools.render(), "CronJob")
    refused = tools.template(
        sets=["trainEditor.enabled=true", "trainEditor.persistence.accessModes={ReadWriteOncePod}"],
        check=False,
    )
    assert refused.returncode != 0 and "ReadWriteOncePod" in refused.stderr


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_state_volume_is_read_write_once_pod(tools: Tools, env: str | None) -> None:
    docs = tools.render(values=[chart_values(env)] if env else [])
    assert daemon_claim(docs)["spec"]["accessModes"] == ["ReadWriteOncePod"]


@pytest.mark.parametrize("env", [None, *ENVIRONMENTS])
def test_a_failed_gate_quarantines_with_the_shipped_editor(tools: Tools, env: str | None) -> None:
    """The chart ships the fact memory, whose edits leave other answers alone, so it keeps the
    daemon's gate: a failed audit quarantines; ``warn`` stays one setting away."""
    docs = tools.render(values=[chart_values(env)] if env else [])
    config = yaml.safe_load(only(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["editor"]["method"] == "memory"
    assert config.get("audit", {}).get("on_failure", "quarantine") == "quarantine"
    warned = tools.render(sets=["config.audit.on_failure=warn"])
    warned_config = yaml.safe_load(only(warned, "ConfigMap")["data"]["config.yaml"])
    assert warned_config["audit"]["on_failure"] == "warn"


def test_pod_disruption_budget_is_opt_in(tools: Tools) -> None:
    assert not find(tools.render(values=[chart_values("prod")]), "PodDisruptionBudget")
    docs = tools.render(sets=["podDisruptionBudget.enabled=true"])
    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_admits_only_kafka_mlflow_and_the_scrape(tools: Tools, env: str) -> None:
    docs = tools.render(values=[chart_values(env)])
    policy = only(docs, "NetworkPolicy")["spec"]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    (scraper,) = ingress["from"]
    assert scraper["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    egress = {
        frozenset((p["protocol"], p["port"]) for p in rule["ports"]): rule["to"]
        for rule in policy["egress"]
    }
    assert set(egress) == {
        frozenset({("TCP", 9092), ("TCP", 9093)}),
        frozenset({("TCP", 5000), ("TCP", 80)}),
        frozenset({("UDP", 53), ("TCP", 53)}),
    }
    # The Kafka rule reaches the brokers the rendered config bootstraps from (Strimzi labels).
    config = yaml.safe_load(only(docs, "ConfigMap")["data"]["config.yaml"])
    cluster = config["kafka"]["bootstrap_servers"][0].split("-kafka-bootstrap")[0]
    kafka_peers = egress[frozenset({("TCP", 9092), ("TCP", 9093)})]
    assert kafka_peers == [{"podSelector": {"matchLabels": {"strimzi.io/cluster": cluster}}}]
    assert not find(tools.render(sets=["networkPolicy.enabled=false"]), "NetworkPolicy")


def test_config_change_rolls_the_pod(tools: Tools) -> None:
    def checksum(*sets: str) -> str:
        deployment = only(tools.render(sets=sets), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum()
    assert checksum() != checksum("config.model.device=cuda")


def test_kafka_cluster_topics_and_pool(tools: Tools) -> None:
    docs = parse_manifests(
        tools.template(KAFKA_CHART, values=[kafka_values("prod")], release="kafka").stdout
    )
    kafka = only(docs, "Kafka")
    cluster = kafka["metadata"]["name"]
    topics = {t["spec"]["topicName"]: t for t in find(docs, "KafkaTopic")}
    assert set(topics) == {
        "fact-corrections",
        "fact-corrections.dlq",
        "factkeeper.control",
        "fact-corrections.quarantine",
    }
    assert topics["factkeeper.control"]["spec"]["partitions"] == 1
    pool = only(docs, "KafkaNodePool")
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["spec"]["replicas"] == 3
    for resource in [pool, *topics.values(), *find(docs, "KafkaUser")]:
        assert resource["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple"}
    (user,) = find(docs, "KafkaUser")
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    assert user["spec"]["authorization"]["acls"]

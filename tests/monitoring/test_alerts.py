"""The alert rules are valid Prometheus rules and only use metrics the daemon exports."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import FactkeeperMetrics

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "alerts.yaml"


@pytest.mark.tools
def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: `make test` installs Debian's prometheus package")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_has_for_severity_and_summary():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_rules_reference_only_exported_metrics():
    exported = {m.name for m in FactkeeperMetrics(CollectorRegistry()).registry.collect()}
    exported |= {f"{n}_total" for n in exported}
    rules = yaml.safe_load(RULES.read_text())["groups"]
    used = {
        name
        for group in rules
        for rule in group["rules"]
        for name in re.findall(r"\b(factkeeper_[a-z_]+)", rule["expr"])
    }
    assert used and used <= exported, used - exported

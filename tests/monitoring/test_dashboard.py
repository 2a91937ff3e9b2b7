"""The Grafana dashboard parses and charts only metrics the daemon exports."""

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from monitoring.metrics import FactkeeperMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "monitoring" / "dashboards" / "factkeeper.json"


def _exported() -> set[str]:
    names = set()
    for family in FactkeeperMetrics(CollectorRegistry()).registry.collect():
        names |= {family.name, f"{family.name}_total", f"{family.name}_info"}
        names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum")}
    return names


def test_dashboard_panels_use_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(factkeeper_[a-z_]+)", e)}
    assert len(dashboard["panels"]) >= 10
    assert used and used <= _exported(), used - _exported()


def test_every_design_metric_has_a_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard["panels"])
    for family in FactkeeperMetrics(CollectorRegistry()).registry.collect():
        assert family.name in text, family.name

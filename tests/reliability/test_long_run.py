"""``long_run.py``: its long sizes, its ``--only`` parsing, and how it merges results.

The scenarios themselves are tested at short sizes beside this file; the long run adds only the
long sizes and the bookkeeping, which is what these (broker-free) tests check.
"""

from __future__ import annotations

import argparse
import json
from types import ModuleType

import pytest

from tests.reliability import long_run


@pytest.fixture
def bench() -> ModuleType:
    """The script as a module."""
    return long_run


def test_long_sizes_are_the_issue_9_sizes(bench):
    configs = bench.long_configs(seed=0)
    assert list(configs) == list(bench.SCENARIOS)
    assert list(configs)[:4] == ["crash", "outage", "fuzz", "soak"]
    assert list(configs)[4:] == [
        "topics_late",
        "mlflow_down",
        "control-redelivered",
        "topic-recreated",
    ]
    assert (configs["crash"].events, configs["crash"].kills) == (1000, 10)
    assert configs["outage"].outage_s == 30.0
    assert configs["fuzz"].malformed == 1000
    assert configs["soak"].events == 10_000
    assert configs["mlflow_down"].down_s == 60.0  # issue 17: "MLflow down for 60 s"
    assert configs["topics_late"].produce_after_s > 0


def test_only_takes_a_subset_in_order_and_refuses_unknown_names(bench):
    assert bench.parse_only("soak, crash,soak") == ["soak", "crash"]
    for bad in ("", "crash,chaos"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_only(bad)


def test_results_merge_by_scenario_and_carry_their_invocation(bench, tmp_path):
    out = tmp_path / "reliability.json"
    first = {"command": "python tests/reliability/long_run.py", "git_revision": "a"}
    bench.write_results(out, first, {"crash": {"passed": True}, "soak": {"passed": False}})
    second = {"command": "python tests/reliability/long_run.py --only soak", "git_revision": "b"}
    bench.write_results(out, second, {"soak": {"passed": True}})

    data = json.loads(out.read_text())
    assert data["latest"] == second
    assert data["scenarios"]["crash"] == {"passed": True, "invocation": first}
    assert data["scenarios"]["soak"] == {"passed": True, "invocation": second}

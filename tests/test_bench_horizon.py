"""The long-horizon benchmark resumes where it stopped: a run split in two sessions ends with
the same weights and the same curve as one run, consolidation material included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editing.evaluation import EvalConfig
from editing.requests import LocalityProbe
from editing.tiny import tiny_loaded
from tests.fixtures.threads import torch_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import horizon  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "data"
MEMORY = {"key_layer": 1, "value_layer": 2, "v_optimiser": "adam", "capacity": 16}
METHODS = ["memory", "memory:consolidate_every=4"]


def _config(out: Path, **changes: object) -> horizon.HorizonConfig:
    settings: dict[str, object] = {
        "methods": METHODS,
        "edits": 8,
        "batch": 2,
        "checkpoint": 4,
        "sample_every": 2,
        "out": out,
        "data_dir": FIXTURE,
        "eval_config": EvalConfig(fluency_prompts=1, fluency_new_tokens=4),
        "editor_options": {m: MEMORY for m in METHODS},
        "unrelated": (LocalityProbe("The sky on a clear day is", "blue", "unrelated"),),
        "command": "test",
        **changes,
    }
    return horizon.HorizonConfig(**settings)  # type: ignore[arg-type]


def _final_weights(cfg: horizon.HorizonConfig, method: str) -> dict[str, torch.Tensor]:
    return load_file(str(horizon._state_file(cfg, method, 8, "weights")))


def _curve(out: dict, method: str) -> list[dict]:
    timing = {"eval_seconds", "wall_seconds"}
    curve = out["methods"][method]["curve"]
    return [{k: v for k, v in p.items() if k not in timing} for p in curve]


def test_a_run_in_two_sessions_equals_one_run(tmp_path: Path) -> None:
    whole_cfg = _config(tmp_path / "whole.json")
    whole = horizon.run_horizon(whole_cfg, tiny_loaded("llama"))
    assert whole["finished"]

    split_cfg = _config(tmp_path / "split.json", stop_after=4)
    first = horizon.run_horizon(split_cfg, tiny_loaded("llama"))
    assert not first["finished"]
    assert [p["n_edits"] for p in first["methods"]["memory"]["curve"]] == [4]
    with pytest.raises(horizon.HorizonError, match="exists"):
        horizon.run_horizon(split_cfg, tiny_loaded("llama"))  # never overwrites a run

    resumed_cfg = _config(tmp_path / "split.json", resume=True)
    resumed = horizon.run_horizon(resumed_cfg, tiny_loaded("llama"))
    assert resumed["finished"] and len(resumed["sessions"]) == 2
    for method in METHODS:
        assert _curve(resumed, method) == _curve(whole, method)
        a, b = _final_weights(whole_cfg, method), _final_weights(resumed_cfg, method)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c["held"] for c in resumed["methods"][METHODS[1]]["consolidations"]] == [4, 8]
    # Only the newest checkpoint's state is kept.
    assert sorted(p.name.split(".")[1] for p in resumed_cfg.state_dir.iterdir()) == ["8"] * 3


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    horizon.run_horizon(_config(tmp_path / "r.json", stop_after=4), tiny_loaded("llama"))
    with pytest.raises(horizon.HorizonError, match="batch_size"):
        horizon.run_horizon(
            _config(tmp_path / "r.json", resume=True, batch=4), tiny_loaded("llama")
        )

"""NSEConfig: validation, YAML round trip, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from editing.configfile import ConfigError
from editing.nse.config import PRESETS, NSEConfig, preset_for


def test_yaml_roundtrip(tmp_path: Path) -> None:
    config = PRESETS["smollm2"].replace(lam=123.0, layers=(2, 4))
    path = tmp_path / "nse.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert NSEConfig.from_yaml(path) == config


@pytest.mark.parametrize(
    "bad",
    [
        {"layers": []},
        {"layers": [3, 2]},
        {"neuron_threshold": 0.0},
        {"alpha": 10.0, "upper_bound": 5.0},
        {"max_iterations": 1},
        {"prefixes": ["no placeholder"]},
        {"value_prefixes": 9},
        {"v_optimiser": "sgd"},
        {"v_step": 0.0},
        {"unknown_knob": 1},
    ],
)
def test_bad_values_are_config_errors(bad: dict) -> None:
    with pytest.raises(ConfigError):
        NSEConfig.from_dict(bad)


def test_empty_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="mapping"):
        NSEConfig.from_yaml(path)


def test_presets() -> None:
    assert preset_for("smollm2") is PRESETS["smollm2"]
    assert preset_for("tiny-gpt2") is PRESETS["tiny"]
    assert PRESETS["llama3-8b"].layers == (4, 5, 6, 7, 8) and PRESETS["llama3-8b"].z_layer == 8
    with pytest.raises(ConfigError, match="no NSE preset"):
        preset_for("/some/folder")

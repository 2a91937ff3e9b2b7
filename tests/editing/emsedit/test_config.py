import pytest

from editing.configfile import ConfigError
from editing.emsedit.config import EMSEditConfig, ModuleGroup


def test_defaults_are_valid_and_round_trip_through_json_and_yaml(tmp_path):
    config = EMSEditConfig()
    assert EMSEditConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "emsedit.yaml"
    path.write_text("steps: 1\nmeta_lr: 1.0e-4\nmodules:\n  - {role: down, layers: [3, 4]}\n")
    loaded = EMSEditConfig.from_yaml(path)
    assert loaded.steps == 1 and loaded.meta_lr == 1.0e-4
    assert loaded.modules == (ModuleGroup("down", (3, 4)),)


@pytest.mark.parametrize(
    "changes",
    [
        {"steps": 0},
        {"rank": 0},
        {"mode": "lifelong"},
        {"locality": "l1"},
        {"opt_step_interval": -1},
    ],
)
def test_bad_values_are_rejected(changes):
    with pytest.raises(ConfigError):
        EMSEditConfig().replace(**changes)


def test_bad_files_and_keys(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError):
        EMSEditConfig.from_yaml(empty)
    with pytest.raises(ConfigError, match="unknown"):
        EMSEditConfig.from_dict({"stepz": 2})
    with pytest.raises(ConfigError):
        ModuleGroup("attn", (1,))  # type: ignore[arg-type]


def test_sequential_ranks_halve_per_step():
    config = EMSEditConfig(rank=64, steps=2)
    assert config.n_nets == 2 and [config.net_rank(i) for i in range(2)] == [64, 32]
    assert EMSEditConfig(mode="batch").n_nets == 1


def test_every_shipped_yaml_loads():
    from pathlib import Path

    import editing.emsedit

    folder = Path(editing.emsedit.__file__).parent / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        assert isinstance(EMSEditConfig.from_yaml(path), EMSEditConfig), path

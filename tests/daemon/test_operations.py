"""Operator commands that only read the registry: ``versions`` and ``export``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from daemon.cli import main
from daemon.config import load_settings
from daemon.operations import OperationError, export_version
from daemon.service import Daemon
from editing.paths import Paths
from tests.daemon.harness import config_file, env_for


@pytest.fixture
def versioned(tmp_path, tiny_model_dir, monkeypatch):
    """A daemon's store with one version whose weights differ from the base in one matrix."""
    env = env_for(
        tmp_path, "127.0.0.1:1", "t", tiny_model_dir, FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="10"
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the CLI reads the same settings from the environment
    settings = load_settings(config_file(tmp_path / "home"))
    daemon = Daemon(settings, serve_metrics=False)
    try:
        name = daemon.versions.names[0]
        with torch.no_grad():
            dict(daemon.lm.model.named_parameters())[name].add_(0.25)
        version = daemon.versions.snapshot("test")
        edited = {k: v.clone() for k, v in daemon.lm.model.state_dict().items()}
    finally:
        daemon.close()
    return settings, version, edited


def test_export_writes_a_folder_transformers_loads_with_the_versions_weights(versioned, tmp_path):
    settings, version, edited = versioned
    out = export_version(settings, version, tmp_path / "export", Paths.from_env())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, edited[key]), key
    assert not list(out.glob("*.bin"))  # safetensors only
    assert json.loads((out / "factkeeper-version.json").read_text())["version"] == version
    with pytest.raises(OperationError, match="not empty"):
        export_version(settings, version, out, Paths.from_env())


def test_versions_command_lists_tags_and_aliases(versioned, tmp_path, capsys):
    settings, version, _ = versioned
    assert main(["versions", "--json", "--config", str(config_file(tmp_path / "home"))]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["version"] == version
    assert row["aliases"] == "candidate"
    assert row["reason"] == "test"
    assert row["audit"] == "never audited"  # no audit ran on it: said, not left blank

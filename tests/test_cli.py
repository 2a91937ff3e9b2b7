"""The CLI table, the README and the commands that need no model or broker."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon import cli
from daemon.errors import SettingsError
from editing.configfile import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_command_is_documented_in_the_readme_and_vice_versa():
    documented = set(re.findall(r"^\| `factkeeper ([a-z-]+)", README.read_text(), re.MULTILINE))
    assert documented == set(cli.COMMANDS)


def test_readme_has_exactly_two_setup_commands():
    section = README.read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL) == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci


def test_version_prints_pinned_libraries(capsys):
    assert cli.main(["version"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"^transformers 5\.23\.", out, re.MULTILINE)


def test_typed_errors_become_a_message_and_exit_2(capsys, tmp_path):
    code = cli.main(["ask", "hello", "--model", str(tmp_path / "missing")])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "factkeeper ask:" in err and "no hub downloads" in err


def test_invalid_settings_are_a_config_error_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka:\n  session_timeout_ms: -1\n")
    assert cli.main(["config", "show", "--config", str(bad)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"factkeeper config: invalid configuration in {bad}:" in err
    assert "  kafka.session_timeout_ms: " in err
    assert issubclass(SettingsError, ConfigError)  # one concept: an invalid configuration


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


@pytest.mark.smollm2
def test_ask_prints_only_the_answer(capsys):
    assert cli.main(["ask", "The capital of France is", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(" Paris")


@pytest.mark.parametrize(
    ("args", "turns", "deprecated"),
    [([], 500, False), (["--turns", "7"], 7, False), (["--steps", "9"], 9, True)],
)
def test_train_editor_takes_turns_and_the_deprecated_steps(
    monkeypatch, capsys, tmp_path, args, turns, deprecated
):
    import editing.emsedit.train as train

    called = {}

    def fake_train(**kwargs):
        called.update(kwargs)
        return SimpleNamespace(out=tmp_path / "editor")

    monkeypatch.setattr(train, "train_from_dataset", fake_train)
    assert cli.main(["train-editor", *args]) == cli.EXIT_OK
    assert called["batches"] == turns
    err = capsys.readouterr().err
    warning = "factkeeper train-editor: --steps is deprecated; use --turns"
    assert (warning in err) == deprecated


def test_train_value_net_passes_its_settings_and_provenance(monkeypatch, capsys, tmp_path):
    import editing.models
    import editing.nse.value_training as training

    called = {}
    monkeypatch.setattr(editing.models, "load_model", lambda name: SimpleNamespace(name="smollm2"))
    monkeypatch.setattr(training, "training_requests", lambda cf, zsre: [f"cf{cf}", f"zsre{zsre}"])
    monkeypatch.setattr(training, "train_value_net", lambda *a, **k: called.update(args=a, **k))
    args = ["train-value-net", "--counterfact", "12", "--zsre", "3", "--steps", "2"]
    assert cli.main([*args, "--out", str(tmp_path / "run"), "--no-resume"]) == cli.EXIT_OK
    lm, requests, config, out, settings = called["args"]
    assert requests == ["cf12", "zsre3"] and out == tmp_path / "run"
    assert (settings.steps, settings.batch, config.z_layer) == (2, 8, 7)
    assert called["resume"] is False
    assert called["provenance"]["data"] == "counterfact/train[:12] + zsre/train[:3]"
    assert called["provenance"]["command"].startswith("factkeeper train-value-net --counterfact 12")
    assert str(tmp_path / "run" / "value-net.safetensors") in capsys.readouterr().out

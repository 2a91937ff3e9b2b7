"""Settings: defaults, YAML + environment precedence, field-naming errors, masked secrets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import Settings, default_config_text, load_settings
from daemon.errors import SettingsError
from editing.registry import EDITORS
from editing.safeguard_config import SafeguardConfig
from monitoring.gates import GateThresholds

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SECRET = "hunter2-very-secret-value"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose FACTKEEPER_HOME is a temporary folder."""
    return {"FACTKEEPER_HOME": str(tmp_path / "home")}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problem_paths(exc: SettingsError) -> set[str]:
    return {path for path, _ in exc.problems}


def test_defaults_load_with_paths_under_factkeeper_home(env: dict[str, str]) -> None:
    settings = load_settings(None, env=env)
    home = Path(env["FACTKEEPER_HOME"])
    assert settings.kafka.topics.corrections == "fact-corrections"
    assert settings.kafka.topics.dlq == "fact-corrections.dlq"
    assert settings.kafka.max_poll_interval_ms == 900_000
    assert settings.editor.method == "memory"
    assert settings.batching.max_size == 8
    assert settings.journal.path == home / "state" / "journal.sqlite3"
    assert settings.snapshots.tracking_uri == f"sqlite:///{(home / 'mlflow' / 'mlflow.db')}"
    assert settings.metrics.port == 9108


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path, env: dict[str, str]) -> None:
    assert isinstance(load_settings(path, env=env), Settings)


def test_default_yaml_documents_exactly_the_defaults(env: dict[str, str]) -> None:
    assert load_settings(REPO / "configs" / "default.yaml", env=env) == load_settings(None, env=env)


def test_packaged_default_yaml_is_configs_default_yaml() -> None:
    """The wheel's copy (``factkeeper config default``) must not drift from configs/."""
    assert default_config_text() == (REPO / "configs" / "default.yaml").read_text()


def test_env_overrides_yaml_overrides_defaults(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(
        tmp_path,
        "kafka:\n  group_id: from-yaml\n  session_timeout_ms: 30000\n"
        "  topics:\n    corrections: yaml-in\n    dlq: yaml-dlq\n",
    )
    env |= {"FACTKEEPER_KAFKA__GROUP_ID": "from-env", "FACTKEEPER_KAFKA__TOPICS__DLQ": "env-dlq"}
    settings = load_settings(path, env=env)
    assert settings.kafka.group_id == "from-env"
    assert settings.kafka.session_timeout_ms == 30000
    assert settings.kafka.topics.corrections == "yaml-in"
    assert settings.kafka.topics.dlq == "env-dlq"
    assert settings.kafka.topics.control == "factkeeper.control"


def test_env_strings_are_converted_to_field_types(env: dict[str, str]) -> None:
    env |= {
        "FACTKEEPER_KAFKA__BOOTSTRAP_SERVERS": "b1:9092, b2:9093",
        "FACTKEEPER_BATCHING__LINGER_MS": "50",
        "FACTKEEPER_SAFEGUARDS__NORMGUARD": "false",
        "FACTKEEPER_AUDIT__MAX_DROP": "0.02",
        "FACTKEEPER_JOURNAL__PATH": "/var/lib/fk/journal.sqlite3",
    }
    settings = load_settings(None, env=env)
    assert settings.kafka.bootstrap_servers == ("b1:9092", "b2:9093")
    assert settings.batching.linger_ms == 50
    assert settings.safeguards.config.normguard is False
    assert settings.audit.thresholds.max_drop == 0.02
    assert settings.journal.path == Path("/var/lib/fk/journal.sqlite3")


def test_empty_env_value_resets_a_field_to_null(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "editor:\n  checkpoint: /models/editor\n")
    assert load_settings(path, env=env).editor.checkpoint == Path("/models/editor")
    env["FACTKEEPER_EDITOR__CHECKPOINT"] = ""
    assert load_settings(path, env=env).editor.checkpoint is None


def test_invalid_values_name_every_field(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(
        tmp_path,
        "kafka:\n  session_timeout_ms: 10\n  security_protocol: TLS\n"
        "metrics:\n  port: 70000\neditor:\n  method: memit\naudit:\n  retention_floor: 1.5\n",
    )
    env["FACTKEEPER_BATCHING__MAX_SIZE"] = "lots"
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert problem_paths(caught.value) == {
        "kafka.session_timeout_ms",
        "kafka.security_protocol",
        "metrics.port",
        "editor.method",
        "audit.retention_floor",
        "batching.max_size",
    }
    message = str(caught.value)
    assert str(path) in message
    assert "batching.max_size: " in message and "(from FACTKEEPER_BATCHING__MAX_SIZE)" in message


def test_editor_names_are_the_registry_names(tmp_path: Path, env: dict[str, str]) -> None:
    """Every method the registry has is accepted, anything else is refused with the list."""
    for name in EDITORS:
        method = load_settings(None, env={**env, "FACTKEEPER_EDITOR__METHOD": name}).editor.method
        assert method == name
    path = write(
        tmp_path,
        "editor:\n  method: memit\n  retry_ladder: [{method: rome}]\n"
        "safeguards:\n  methods: [emsedit, mend]\n",
    )
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert problem_paths(caught.value) == {
        "editor.method",
        "editor.retry_ladder.0.method",
        "safeguards.methods.1",
    }
    known = ", ".join(sorted(EDITORS))
    assert f"editor.method: unknown editor 'memit'; known: {known}" in str(caught.value)


def test_a_misspelt_editor_option_fails_at_load_with_its_name(
    tmp_path: Path, env: dict[str, str]
) -> None:
    path = write(
        tmp_path,
        "editor:\n  method: ft\n  options: {num_steps: 3, num_stepz: 3}\n"
        "  retry_ladder: [{options: {lrr: 0.1}}, {method: none, options: {x: 1}}]\n",
    )
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert problem_paths(caught.value) == {
        "editor.options.num_stepz",
        "editor.retry_ladder.0.options.lrr",
        "editor.retry_ladder.1.options.x",
    }
    message = str(caught.value)
    ft_options = "consolidate_steps, depth, layer, lr, norm_constraint, num_steps, stop_nll"
    assert f"editor.options.num_stepz: not an option of ft (its options: {ft_options})" in message
    assert "not an option of none (its options: none)" in message


def test_editor_options_beyond_the_config_fields_are_accepted(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Constructor options that are not config fields (NSE's ``stats_tokens``) are options too."""
    path = write(tmp_path, "editor:\n  method: nse\n  options: {stats_tokens: 8192, lam: 1.0}\n")
    assert load_settings(path, env=env).editor.options == {"stats_tokens": 8192, "lam": 1.0}


def test_audit_holds_the_gate_thresholds_written_flat(tmp_path: Path, env: dict[str, str]) -> None:
    """The thresholds are ``GateThresholds`` fields, declared and checked there only."""
    assert load_settings(None, env=env).audit.thresholds == GateThresholds()
    path = write(tmp_path, "audit:\n  every_n_edits: 7\n  max_drop: 0.02\n")
    audit = load_settings(path, env={**env, "FACTKEEPER_AUDIT__LOCALITY_FLOOR": "0.5"}).audit
    assert audit.every_n_edits == 7
    assert audit.thresholds == GateThresholds(max_drop=0.02, locality_floor=0.5)
    shown = audit.model_dump(mode="json")
    assert "thresholds" not in shown and shown["max_drop"] == 0.02
    assert list(shown)[:4] == [
        "every_n_edits",
        "every_minutes",
        "retention_floor",
        "locality_floor",
    ]


def test_safeguards_hold_the_safeguard_config_written_flat(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Every ``SafeguardConfig`` field is a setting, declared, defaulted and checked there."""
    assert load_settings(None, env=env).safeguards.config == SafeguardConfig()
    path = write(tmp_path, "safeguards:\n  mask_p: 0.5\n  preserve_ridge: 0.1\n  methods: [ft]\n")
    safeguards = load_settings(path, env={**env, "FACTKEEPER_SAFEGUARDS__MASK": "false"})
    assert safeguards.safeguards.config == SafeguardConfig(
        mask_p=0.5, preserve_ridge=0.1, mask=False
    )
    assert safeguards.safeguards.wraps("ft") and not safeguards.safeguards.wraps("emsedit")
    shown = safeguards.redacted_dict()["safeguards"]
    assert set(shown) == set(SafeguardConfig.__dataclass_fields__) | {"methods", "corpus"}
    bad = write(tmp_path, "safeguards:\n  mask_p: 0\n  stats_tokens: 1000\n  max_unexplained: 0\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(bad, env=env)
    assert problem_paths(caught.value) == {
        "safeguards.mask_p",
        "safeguards.stats_tokens",
        "safeguards.max_unexplained",
    }
    assert "safeguards.mask_p: safeguards: mask_p must be in (0, 1], got 0" in str(caught.value)


def test_former_safeguard_names_load_with_a_warning(
    tmp_path: Path, env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The switches took the names of method specs (``emsedit+mask``); old files still load."""
    path = write(tmp_path, "safeguards:\n  neuron_mask: false\n  original_weight_targets: false\n")
    with caplog.at_level(logging.WARNING, logger="daemon.config"):
        settings = load_settings(path, env={**env, "FACTKEEPER_SAFEGUARDS__NORM_GUARD": "false"})
    assert settings.safeguards.config == SafeguardConfig(mask=False, rewind=False, normguard=False)
    assert "safeguards.neuron_mask is deprecated: it is now safeguards.mask" in caplog.text
    assert "safeguards.norm_guard is deprecated: it is now safeguards.normguard" in caplog.text
    both = write(tmp_path, "safeguards:\n  preserved_knowledge: false\n  preserve: true\n")
    with pytest.raises(SettingsError, match="safeguards.preserved_knowledge: the former name of"):
        load_settings(both, env=env)


def test_a_config_object_names_each_invalid_field(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "audit:\n  max_drop: 2\n  locality_floor: lots\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert problem_paths(caught.value) == {"audit.max_drop", "audit.locality_floor"}
    assert "audit.max_drop: GateThresholds.max_drop must be in [0, 1], got 2" in str(caught.value)
    with pytest.raises(SettingsError, match="audit.thresholds: unknown setting"):
        load_settings(write(tmp_path, "audit:\n  thresholds: {max_drop: 0.1}\n"), env=env)


def test_unknown_keys_are_rejected_with_their_path(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "kafka:\n  grop_id: typo\nextras:\n  a: 1\n")
    env["FACTKEEPER_MODEL__FLAVOUR"] = "vanilla"
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert problem_paths(caught.value) == {"kafka.grop_id", "extras", "model.flavour"}
    assert "FACTKEEPER_MODEL__FLAVOUR" in str(caught.value)


def test_removed_max_poll_records_is_accepted_with_a_warning(
    tmp_path: Path, env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """It never had an effect; files and environments that still set it keep loading."""
    path = write(tmp_path, "kafka:\n  group_id: old-file\n  max_poll_records: 8\n")
    with caplog.at_level(logging.WARNING, logger="daemon.config"):
        settings = load_settings(path, env=env)
    assert settings.kafka.group_id == "old-file"
    assert settings == load_settings(None, env=env | {"FACTKEEPER_KAFKA__GROUP_ID": "old-file"})
    assert not hasattr(settings.kafka, "max_poll_records")
    assert "kafka.max_poll_records is deprecated and ignored" in caplog.text

    caplog.clear()
    env["FACTKEEPER_KAFKA__MAX_POLL_RECORDS"] = "500"
    with caplog.at_level(logging.WARNING, logger="daemon.config"):
        load_settings(None, env=env)
    assert "kafka.max_poll_records is deprecated and ignored" in caplog.text


def test_env_name_with_single_underscore_is_reported(env: dict[str, str]) -> None:
    env["FACTKEEPER_KAFKA_GROUP_ID"] = "lost"
    with pytest.raises(SettingsError, match="did you mean FACTKEEPER_KAFKA__GROUP_ID"):
        load_settings(None, env=env)


def test_conflicting_env_names_are_reported(env: dict[str, str]) -> None:
    env |= {"FACTKEEPER_KAFKA__TOPICS": "x", "FACTKEEPER_KAFKA__TOPICS__DLQ": "y"}
    with pytest.raises(SettingsError, match="conflicts with"):
        load_settings(None, env=env)


def test_sasl_needs_mechanism_username_and_password(env: dict[str, str]) -> None:
    env["FACTKEEPER_KAFKA__SECURITY_PROTOCOL"] = "SASL_SSL"
    with pytest.raises(SettingsError) as caught:
        load_settings(None, env=env)
    assert problem_paths(caught.value) == {
        "kafka.sasl_mechanism",
        "kafka.sasl_username",
        "kafka.sasl_password",
    }


def test_sasl_settings_are_accepted_when_complete(env: dict[str, str]) -> None:
    env |= {
        "FACTKEEPER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "FACTKEEPER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "FACTKEEPER_KAFKA__SASL_USERNAME": "factkeeper",
        "FACTKEEPER_KAFKA__SASL_PASSWORD": SECRET,
    }
    kafka = load_settings(None, env=env).kafka
    assert kafka.sasl_password is not None
    assert kafka.sasl_password.get_secret_value() == SECRET


def test_credentials_without_sasl_or_tls_are_rejected(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "kafka:\n  sasl_username: u\n  ssl_cafile: /etc/ca.pem\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert problem_paths(caught.value) == {"kafka.sasl_username", "kafka.ssl_cafile"}


def test_admin_endpoint_needs_a_long_token(env: dict[str, str]) -> None:
    env["FACTKEEPER_ADMIN__ENABLED"] = "true"
    with pytest.raises(SettingsError, match="admin.token: required"):
        load_settings(None, env=env)
    env["FACTKEEPER_ADMIN__TOKEN"] = "tok-3x9q"
    with pytest.raises(SettingsError, match="at least 16") as caught:
        load_settings(None, env=env)
    assert "tok-3x9q" not in str(caught.value)


def test_tracking_uri_must_not_carry_a_password(env: dict[str, str]) -> None:
    env["FACTKEEPER_SNAPSHOTS__TRACKING_URI"] = f"https://ml:{SECRET}@mlflow.internal"
    with pytest.raises(SettingsError, match="snapshots.tracking_uri") as caught:
        load_settings(None, env=env)
    assert SECRET not in str(caught.value)


def test_secrets_are_masked_in_repr_str_and_redacted_dict(env: dict[str, str]) -> None:
    env |= {
        "FACTKEEPER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "FACTKEEPER_KAFKA__SASL_MECHANISM": "PLAIN",
        "FACTKEEPER_KAFKA__SASL_USERNAME": "factkeeper",
        "FACTKEEPER_KAFKA__SASL_PASSWORD": SECRET,
        "FACTKEEPER_ADMIN__ENABLED": "true",
        "FACTKEEPER_ADMIN__TOKEN": SECRET + "-admin",
    }
    settings = load_settings(None, env=env)
    for text in (repr(settings), str(settings), repr(settings.kafka), str(settings.admin)):
        assert SECRET not in text
    shown = settings.redacted_dict()
    assert shown["kafka"]["sasl_password"] == "***"
    assert shown["admin"]["token"] == "***"
    assert shown["kafka"]["sasl_username"] == "factkeeper"
    assert SECRET not in json.dumps(shown)


def test_unset_secrets_stay_null_when_redacted(env: dict[str, str]) -> None:
    shown = load_settings(None, env=env).redacted_dict()
    assert shown["kafka"]["sasl_password"] is None
    assert shown["admin"]["token"] is None


def test_invalid_secret_is_not_echoed(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, f"kafka:\n  sasl_password: [{SECRET}]\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env=env)
    assert "kafka.sasl_password" in problem_paths(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- kafka\n", "top level must be a mapping"),
        ("kafka: [unclosed\n", "line 2"),
    ],
)
def test_unusable_files_give_clear_errors(
    tmp_path: Path, env: dict[str, str], text: str, expected: str
) -> None:
    with pytest.raises(SettingsError, match=expected):
        load_settings(write(tmp_path, text), env=env)


def test_missing_file_names_the_file(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="does not exist; copy configs/default.yaml"):
        load_settings(tmp_path / "nope.yaml", env=env)


def test_settings_are_frozen(env: dict[str, str]) -> None:
    settings = load_settings(None, env=env)
    with pytest.raises(ValueError, match="frozen"):
        settings.kafka.group_id = "other"  # type: ignore[misc]


def test_config_and_schema_modules_do_not_import_torch() -> None:
    code = (
        "import sys, daemon.config, daemon.ingest.events, daemon.control.commands, "
        "daemon.records.journal; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_control_key_must_not_reuse_the_admin_token(env: dict[str, str]) -> None:
    secret = "same-secret-0123456789abcdef"
    reused = {**env, "FACTKEEPER_ADMIN__TOKEN": secret, "FACTKEEPER_CONTROL__KEYS__K1": secret}
    with pytest.raises(SettingsError, match="separate secrets"):
        load_settings(None, env=reused)
    settings = load_settings(None, env={**reused, "FACTKEEPER_CONTROL__KEYS__K1": secret + "x"})
    assert settings.redacted_dict()["control"]["keys"] == {"k1": "***"}
    assert settings.control.signing_key()[0] == "k1"


def test_audits_with_snapshots_off_are_refused_at_load(env: dict[str, str]) -> None:
    snapshots_off = {
        **env,
        "FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS": "0",
        "FACTKEEPER_SNAPSHOTS__EVERY_MINUTES": "0",
        "FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN": "false",
    }
    # A failed gate would have no version to roll back to: refuse, and say what to change.
    with pytest.raises(SettingsError, match="could neither roll back nor quarantine") as raised:
        load_settings(None, env={**snapshots_off, "FACTKEEPER_AUDIT__EVERY_MINUTES": "0"})
    assert "snapshots.on_shutdown: true" in str(raised.value)
    # Either section on its own is fine.
    off = {"FACTKEEPER_AUDIT__EVERY_N_EDITS": "0", "FACTKEEPER_AUDIT__EVERY_MINUTES": "0"}
    assert load_settings(None, env={**snapshots_off, **off}).audit.every_n_edits == 0
    on_shutdown = {**snapshots_off, "FACTKEEPER_SNAPSHOTS__ON_SHUTDOWN": "true"}
    assert load_settings(None, env=on_shutdown).audit.every_n_edits == 100

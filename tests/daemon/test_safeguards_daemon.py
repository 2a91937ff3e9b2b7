"""The daemon wraps its editor with the safeguards and keeps their memory in step with versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.config import load_settings
from daemon.ingest.applier import to_request
from daemon.service import Daemon, build_editor
from editing.paths import Paths
from editing.registry import get_editor
from editing.safeguard_config import SafeguardConfig
from editing.safeguards import GuardedEditor
from tests.daemon.builders import to_bytes
from tests.daemon.harness import (
    FT_OPTIONS,
    config_file,
    create_topics,
    env_for,
    fact,
    produce,
)
from tests.editing.conftest import small_key_statistics
from tests.editing.test_safeguards import CORPUS


def test_emsedit_is_guarded_by_default_and_other_methods_are_not(tmp_path):
    env = {"FACTKEEPER_HOME": str(tmp_path)}
    ems = load_settings(None, env={**env, "FACTKEEPER_EDITOR__METHOD": "emsedit"})
    editor = build_editor(ems)
    assert isinstance(editor, GuardedEditor) and editor.inner.name == "emsedit"
    assert editor.config == ems.safeguards.config == SafeguardConfig()
    assert not isinstance(build_editor(load_settings(None, env=env)), GuardedEditor)  # ft
    only_ft = tmp_path / "factkeeper.yaml"
    only_ft.write_text("editor: {method: emsedit}\nsafeguards: {methods: [ft]}\n")
    off = load_settings(only_ft, env=env)
    assert not isinstance(build_editor(off), GuardedEditor)


@pytest.mark.kafka
def test_rollback_resets_the_safeguards_memory_to_the_versions_edits(
    kafka_broker, kafka_topic, tiny_model_dir, tmp_path
):
    create_topics(kafka_broker, kafka_topic)
    produce(kafka_broker, kafka_topic, [to_bytes(fact(i)) for i in range(8)])
    env = env_for(
        tmp_path,
        kafka_broker,
        kafka_topic,
        tiny_model_dir,
        FACTKEEPER_SNAPSHOTS__EVERY_N_EDITS="4",
    )
    settings = load_settings(config_file(Path(env["FACTKEEPER_HOME"])), env=env)
    stats = small_key_statistics(tmp_path / "stats", CORPUS)
    config = SafeguardConfig.only(["rewind", "preserve"], preserve_lambda=1.0, max_unexplained=1.0)
    editor = GuardedEditor(get_editor("ft", **FT_OPTIONS), config, stats=stats)
    daemon = Daemon(settings, editor=editor, serve_metrics=False, paths=Paths(tmp_path / "home"))
    try:
        daemon.run(idle_timeout_s=3.0, handle_signals=False)
        applied = daemon.journal.applied_events()
        assert len(applied) >= 5, "the test needs edits on both sides of the first version"
        after_all = {k: v.clone() for k, v in editor.memory.items()}
        first = daemon.versions.registry.versions()[-1]
        held_ids = daemon.versions.read(first.version)[1].event_ids
        assert 0 < len(held_ids) < len(applied)

        daemon.history.rollback(first.version, "test")

        held = [to_request(daemon.journal.get(i).event) for i in held_ids]
        expected = GuardedEditor(
            get_editor("ft", **FT_OPTIONS), config, stats=stats, originals=daemon._base.get
        )
        expected.reset_memory(daemon.lm, held)
        assert set(editor.memory) == set(expected.memory)
        for name, value in expected.memory.items():
            assert torch.allclose(editor.memory[name], value, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(after_all[name], value, rtol=1e-3)
    finally:
        daemon.close()

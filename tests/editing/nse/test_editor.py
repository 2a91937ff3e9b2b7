"""NSE on a tiny llama trained to know a few facts: the edit takes, leaves the other facts, is
pure until applied, undoes exactly, is deterministic, computes targets on the original weights,
and its state survives a safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editing.edit_state import EditState, EditStateError
from editing.editors.base import EditError
from editing.generation import greedy_generate
from editing.keystats import KeyStatistics
from editing.models import LoadedModel
from editing.nse import PRESETS, NSEEditor
from editing.registry import EDITORS, get_editor
from editing.requests import EditRequest
from tests.editing.nse.conftest import FACTS

EDIT = EditRequest("e1", "The twin city of Paris", "Paris", "Japan")
SECOND = EditRequest("e2", "The twin city of Japan", "Japan", "Rome")


def _answers(lm: LoadedModel) -> list[str]:
    return [
        a.strip(" .") for a in greedy_generate(lm.model, lm.tokenizer, [p for p, _, _ in FACTS], 1)
    ]


def _editor(stats: KeyStatistics) -> NSEEditor:
    return NSEEditor(PRESETS["tiny"], stats=stats)


def _weights(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def test_registered() -> None:
    assert EDITORS["nse"] is NSEEditor
    assert isinstance(get_editor("nse"), NSEEditor)


def test_the_trained_model_knows_its_facts(trained_lm: LoadedModel) -> None:
    assert _answers(trained_lm) == [answer for _, _, answer in FACTS]


def test_edit_takes_and_keeps_other_facts(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    editor = _editor(small_stats)
    result = editor.apply(trained_lm, [EDIT])
    assert _answers(trained_lm) == ["Japan", "Japan", "Paris"]
    assert result.info["passes"] >= 1
    assert result.info["residual_after"][0] < result.info["residual_before"][0]
    names = {
        trained_lm.adapter.weight_name(trained_lm.adapter.roles()[-1], layer) for layer in (1, 2)
    }
    assert set(result.deltas) == names
    assert editor.state is not None and editor.state.edits_seen == 1


def test_compute_deltas_is_pure_and_apply_writes_the_same(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    editor = _editor(small_stats)
    before = _weights(trained_lm)
    deltas = editor.compute_deltas(trained_lm, [EDIT])
    after = _weights(trained_lm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert editor.state is not None and editor.state.edits_seen == 0
    assert all(m.abs().sum() == 0 for m in editor.state.memory.values())
    result = editor.apply(trained_lm, [EDIT])
    assert all(torch.equal(deltas[k], result.deltas[k]) for k in deltas)


def test_undo_restores_weights_and_memory_exactly(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    editor = _editor(small_stats)
    editor.apply(trained_lm, [SECOND])
    assert editor.state is not None
    memory_before = editor.state.memory_copy()
    weights_before = _weights(trained_lm)
    result = editor.apply(trained_lm, [EDIT])
    assert editor.state.edits_seen == 2
    editor.undo(trained_lm, result)
    weights_after = _weights(trained_lm)
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert all(torch.equal(memory_before[k], editor.state.memory[k]) for k in memory_before)
    assert editor.state.edits_seen == 1


def test_deterministic(trained_state: dict[str, torch.Tensor], small_stats: KeyStatistics) -> None:
    from editing.tiny import tiny_loaded

    runs = []
    for _ in range(2):
        lm = tiny_loaded("llama")
        lm.model.load_state_dict(trained_state)
        editor = _editor(small_stats)
        editor.apply(lm, [SECOND])
        runs.append(editor.apply(lm, [EDIT]).deltas)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_targets_use_the_original_weights(
    trained_lm: LoadedModel, trained_state: dict[str, torch.Tensor], small_stats: KeyStatistics
) -> None:
    from editing.tiny import tiny_loaded

    editor = _editor(small_stats)
    editor.apply(trained_lm, [SECOND])  # the model has drifted now
    z_after_drift = editor.targets(trained_lm, [EDIT])

    fresh = tiny_loaded("llama")
    fresh.model.load_state_dict(trained_state)
    z_on_base = _editor(small_stats).targets(fresh, [EDIT])
    assert torch.equal(z_after_drift, z_on_base)


def test_sequential_edits_keep_earlier_ones(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    editor = _editor(small_stats)
    editor.apply(trained_lm, [EDIT])
    editor.apply(trained_lm, [SECOND])
    assert _answers(trained_lm) == ["Japan", "Japan", "Rome"]


def test_state_roundtrip_reproduces_the_next_edit(
    tmp_path: Path,
    trained_lm: LoadedModel,
    trained_state: dict[str, torch.Tensor],
    small_stats: KeyStatistics,
) -> None:
    from editing.tiny import tiny_loaded

    editor = _editor(small_stats)
    first = editor.apply(trained_lm, [EDIT])
    assert editor.state is not None
    path = tmp_path / "nse-state.safetensors"
    editor.state.save(path, extra={"config": PRESETS["tiny"].to_dict()})
    loaded = EditState.load(path)
    assert loaded.edits_seen == 1 and loaded.layers == editor.state.layers
    assert all(torch.equal(loaded.memory[k], editor.state.memory[k]) for k in loaded.memory)
    assert all(
        torch.equal(loaded.originals[k], editor.state.originals[k]) for k in loaded.originals
    )
    assert set(loaded.targets) == set(editor.state.targets)

    # A restarted process: base weights + the applied deltas + the saved state.
    restarted = tiny_loaded("llama")
    restarted.model.load_state_dict(trained_state)
    with torch.no_grad():
        for name, delta in first.deltas.items():
            restarted.model.get_parameter(name).add_(delta)
    resumed = NSEEditor(PRESETS["tiny"], stats=small_stats, state=loaded)
    expected = editor.compute_deltas(trained_lm, [SECOND])
    got = resumed.compute_deltas(restarted, [SECOND])
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_state_of_other_weights_is_refused(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    state = EditState.from_model(trained_lm, (1, 2))
    state.base_hash = "something-else"
    with pytest.raises(EditStateError, match="base weights"):
        NSEEditor(PRESETS["tiny"], stats=small_stats, state=state).compute_deltas(
            trained_lm, [EDIT]
        )


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_families_edit_in_stored_orientation(family: str, small_stats: KeyStatistics) -> None:
    from editing.tiny import tiny_loaded

    lm = tiny_loaded(family)
    before = _weights(lm)
    result = NSEEditor(PRESETS["tiny"], stats=small_stats).apply(lm, [EDIT])
    for name, delta in result.deltas.items():
        assert delta.shape == before[name].shape and delta.is_contiguous()
        assert torch.equal(lm.model.state_dict()[name], before[name] + delta)
    assert result.info["residual_after"][0] < result.info["residual_before"][0]


def test_batched_targets_are_each_requests_own_optimisation(trained_lm: LoadedModel) -> None:
    from editing.nse.keys import compute_targets

    config = PRESETS["tiny"]
    requests = [EDIT, SECOND, EditRequest("e3", "The twin city of Rome", "Rome", "Paris")]
    together = compute_targets(trained_lm, requests, config.z_layer, config)
    for request, value in zip(requests, together, strict=True):
        (alone,) = compute_targets(trained_lm, [request], config.z_layer, config)
        assert value.steps == alone.steps
        assert torch.allclose(value.z, alone.z, rtol=1e-4, atol=1e-5)
        assert abs(value.nll - alone.nll) < 1e-4
    assert any(v.steps > 0 for v in together)
    assert not torch.allclose(together[0].z, together[1].z)


def test_method_spec_options_override_the_preset(trained_lm: LoadedModel) -> None:
    editor = get_editor("nse:v_optimiser=normalised:v_num_grad_steps=4")
    config = editor.config_for(trained_lm)
    assert (config.v_optimiser, config.v_num_grad_steps) == ("normalised", 4)
    assert config.lam == PRESETS["tiny"].lam
    with pytest.raises(EditError, match="no_such_knob is not an option of nse"):
        get_editor("nse:no_such_knob=1")
    with pytest.raises(EditError, match="unknown NSE option"):  # built directly, too
        NSEEditor(no_such_knob=1)


def test_normalised_steps_reach_the_target_in_few_steps(trained_lm: LoadedModel) -> None:
    from editing.nse.keys import compute_targets

    config = PRESETS["tiny"].replace(v_optimiser="normalised", v_num_grad_steps=6, v_step=0.5)
    start = PRESETS["tiny"].replace(v_num_grad_steps=1)
    (before,) = compute_targets(trained_lm, [EDIT], config.z_layer, start)
    (value,) = compute_targets(trained_lm, [EDIT], config.z_layer, config)
    assert 0 < value.steps <= 5
    assert value.nll < 0.5 * before.nll
    assert float((value.z - value.h_init).norm()) <= config.clamp_norm_factor * float(
        value.h_init.norm()
    ) * (1 + 1e-5)


def test_originals_come_from_the_source_the_daemon_gives(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    base = _weights(trained_lm)
    _editor(small_stats).apply(trained_lm, [EDIT])  # the model now holds an edit
    editor = _editor(small_stats)
    editor.set_originals(lambda name: base[name])
    state = editor.state_for(trained_lm)
    for layer in PRESETS["tiny"].layers:
        name = trained_lm.adapter.weight_name(trained_lm.adapter.roles()[-1], layer)
        assert torch.equal(state.originals[layer], trained_lm.adapter.to_stored(base[name]))
        assert not torch.equal(state.originals[layer], trained_lm.model.state_dict()[name])
    trained_lm.model.load_state_dict(base)


def test_reset_memory_rebuilds_the_memory_of_exactly_the_held_edits(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    base = _weights(trained_lm)
    running = _editor(small_stats)
    running.set_originals(lambda name: base[name])
    running.apply(trained_lm, [EDIT])
    running.apply(trained_lm, [SECOND])
    assert running.state is not None and running.state.edits_seen == 2
    rebuilt = _editor(small_stats)
    rebuilt.set_originals(lambda name: base[name])
    rebuilt.reset_memory(trained_lm, [EDIT, SECOND])
    first_only = _editor(small_stats)
    first_only.set_originals(lambda name: base[name])
    first_only.reset_memory(trained_lm, [EDIT])
    assert rebuilt.state is not None and first_only.state is not None
    assert rebuilt.state.edits_seen == 2
    for layer, memory in running.state.memory.items():
        assert memory.abs().sum() > 0
        assert torch.allclose(rebuilt.state.memory[layer], memory, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(first_only.state.memory[layer], memory, rtol=1e-3)
    trained_lm.model.load_state_dict(base)


def test_stats_tokens_sizes_the_default_key_statistics(tmp_path: Path) -> None:
    from editing.paths import Paths

    editor = get_editor("nse:stats_tokens=8192", paths=Paths(tmp_path))
    assert editor._default_stats().max_tokens == 8192
    assert NSEEditor(paths=Paths(tmp_path))._default_stats().max_tokens == 65_536


def test_consolidate_equals_one_joint_batch_from_the_originals(
    trained_lm: LoadedModel, trained_state: dict[str, torch.Tensor], small_stats: KeyStatistics
) -> None:
    from editing.tiny import tiny_loaded

    editor = _editor(small_stats)
    editor.apply(trained_lm, [EDIT])
    editor.apply(trained_lm, [SECOND])  # two sequential batches: the second on the drift
    sequential = _weights(trained_lm)
    trained_lm.model.load_state_dict(trained_state)  # the caller resets to the base weights
    consolidated = editor.consolidate(trained_lm, [EDIT, SECOND])
    assert _answers(trained_lm) == ["Japan", "Japan", "Rome"]
    assert editor.state is not None and editor.state.edits_seen == 2

    fresh = tiny_loaded("llama")
    fresh.model.load_state_dict(trained_state)
    joint = _editor(small_stats).apply(fresh, [EDIT, SECOND])
    assert all(torch.equal(consolidated.deltas[k], joint.deltas[k]) for k in joint.deltas)
    assert any(not torch.equal(sequential[k], _weights(trained_lm)[k]) for k in joint.deltas)

    editor.undo(trained_lm, consolidated)  # back to the base and the two-batch memory
    assert editor.state.edits_seen == 2
    assert all(
        torch.equal(trained_lm.model.state_dict()[k], trained_state[k]) for k in joint.deltas
    )


def test_stored_material_spares_the_value_optimisation_and_gives_the_same_solve(
    trained_lm: LoadedModel,
    trained_state: dict[str, torch.Tensor],
    small_stats: KeyStatistics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from editing.nse import editor as nse_editor
    from editing.tiny import tiny_loaded

    first = _editor(small_stats)
    first.apply(trained_lm, [EDIT])
    material = first.edit_material(trained_lm, [EDIT, SECOND])
    assert set(material) == {"e1", "e2"} and material["e1"].tensors["z"].ndim == 1
    expected = first.consolidate(_reset(trained_lm, trained_state), [EDIT, SECOND]).deltas

    fresh = tiny_loaded("llama")
    fresh.model.load_state_dict(trained_state)
    second = _editor(small_stats)

    def no_optimisation(*args: object, **kwargs: object) -> None:
        raise AssertionError("z was recomputed")

    monkeypatch.setattr(nse_editor, "compute_targets", no_optimisation)
    assert all(second.take_material(fresh, r, material[r.request_id]) for r in (EDIT, SECOND))
    got = second.consolidate(fresh, [EDIT, SECOND]).deltas
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    other = NSEEditor(PRESETS["tiny"], stats=small_stats, v_num_grad_steps=3)
    assert not other.take_material(fresh, EDIT, material["e1"])  # other settings, other z


def _reset(lm: LoadedModel, state: dict[str, torch.Tensor]) -> LoadedModel:
    lm.model.load_state_dict(state)
    return lm


def test_a_variant_shares_originals_statistics_and_memory(
    trained_lm: LoadedModel, small_stats: KeyStatistics
) -> None:
    editor = _editor(small_stats)
    precise = editor.variant("nse", v_optimiser="normalised", v_step=0.5)
    assert precise is not None and editor.variant("ft") is None
    assert precise.config_for(trained_lm).v_optimiser == "normalised"
    assert precise.config_for(trained_lm).lam == PRESETS["tiny"].lam  # the given config, too
    precise.apply(trained_lm, [EDIT])  # the variant edits ...
    state = editor.state_for(trained_lm)  # ... and the editor's memory holds it
    assert state.edits_seen == 1 and precise.state_for(trained_lm) is state
    editor.reset_memory(trained_lm, [])
    assert precise.state_for(trained_lm).edits_seen == 0

"""The fact memory on a tiny llama trained to know a few facts: a row fires only where its key is
read, an edit takes while every other prompt's logits stay bit-identical, undo is exact, a full
memory refuses without writing, and a stopped forward never leaks its addition into the next."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editing.bench import run_bench
from editing.editors.base import EditError
from editing.evaluation import EvalConfig
from editing.generation import greedy_generate
from editing.hooks import run_until
from editing.memory.editor import MemoryEditor, RowCache
from editing.memory.module import FactMemory, memory_of
from editing.models import LoadedModel
from editing.registry import get_editor
from editing.requests import EditRequest, LocalityProbe
from editing.residual import forward_from_layer, layer_input
from editing.tiny import tiny_loaded
from tests.editing.nse.conftest import FACTS, trained_lm, trained_state  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

EDIT = EditRequest("e1", "The twin city of Paris", "Paris", "Japan")
# Tiny models: the key at block 1, the value into block 2's output, NSE's tiny value settings.
OPTIONS = {"key_layer": 1, "value_layer": 2, "v_optimiser": "adam", "capacity": 8}
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture
def lm(trained_lm: LoadedModel) -> LoadedModel:  # noqa: F811 (the imported fixture)
    """The tiny llama that knows ``FACTS`` (the NSE tests' fixture), fresh for each test."""
    return trained_lm


def _logits(lm: LoadedModel, prompt: str) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits


def _answer(lm: LoadedModel, prompt: str) -> str:
    return greedy_generate(lm.model, lm.tokenizer, [prompt], 1)[0].strip(" .")


def test_spec_and_options() -> None:
    assert isinstance(get_editor("memory:threshold=0.9"), MemoryEditor)
    assert get_editor("memory:threshold=0.9").config.threshold == 0.9
    with pytest.raises(EditError, match="not an option of memory"):
        get_editor("memory:lam=5")


def test_an_empty_memory_changes_nothing(lm: LoadedModel) -> None:
    before = _logits(lm, FACTS[0][0])
    MemoryEditor(**OPTIONS).prepare_model(lm)
    assert torch.equal(_logits(lm, FACTS[0][0]), before)


def test_edit_takes_and_leaves_every_other_prompt_bit_identical(lm: LoadedModel) -> None:
    editor = MemoryEditor(**OPTIONS)
    editor.prepare_model(lm)
    others = [p for p, subject, _ in FACTS if subject != EDIT.subject]
    before = {p: _logits(lm, p) for p in others}
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    deltas = editor.compute_deltas(lm, [EDIT])
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())  # pure
    assert set(deltas) == {
        f"model.layers.1.fact_memory.{n}"
        for n in (
            "keys",
            "values",
            "thresholds",
            "lead_keys",
            "lead_thresholds",
            "lead_offsets",
            "centres",
        )
    }
    result = editor.apply(lm, [EDIT])
    assert _answer(lm, EDIT.prompt) == EDIT.target_new
    assert all(torch.equal(_logits(lm, p), before[p]) for p in others)
    assert result.info["memory_rows_used"] == 1
    editor.undo(lm, result)
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    assert _answer(lm, EDIT.prompt) == FACTS[0][2]


def test_a_full_memory_refuses_and_writes_nothing(lm: LoadedModel) -> None:
    editor = MemoryEditor(**{**OPTIONS, "capacity": 1})
    editor.apply(lm, [EDIT])
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    second = EditRequest("e2", "The twin city of Rome", "Rome", "Paris")
    with pytest.raises(EditError, match="memory is full"):
        editor.apply(lm, [second])
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())


def test_another_shape_of_memory_is_refused(lm: LoadedModel) -> None:
    MemoryEditor(**OPTIONS).prepare_model(lm)
    with pytest.raises(EditError, match="fact memory reads layer 1"):
        MemoryEditor(**{**OPTIONS, "capacity": 16}).prepare_model(lm)


def test_consolidation_rewrites_the_rows_from_stored_material(lm: LoadedModel) -> None:
    """The material of an edit (its key and value) lets another editor, after a restart,
    rebuild the same rows from an emptied memory without computing anything."""
    editor = MemoryEditor(**OPTIONS)
    second = EditRequest("e2", "The twin city of Rome", "Rome", "Paris")
    editor.apply(lm, [EDIT, second])
    edited = {k: v.clone() for k, v in lm.model.state_dict().items()}
    material = editor.edit_material(lm, [EDIT, second])
    assert set(material) == {"e1", "e2"}
    memory = memory_of(lm)
    with torch.no_grad():
        for p in (memory.keys, memory.values, memory.thresholds):
            p.zero_()
    fresh = MemoryEditor(**OPTIONS)
    assert all(fresh.take_material(lm, r, material[r.request_id]) for r in (EDIT, second))
    assert not MemoryEditor(**{**OPTIONS, "threshold": 0.9}).take_material(lm, EDIT, material["e1"])

    def no_computing(*_args: object) -> None:
        raise AssertionError("a row was computed again")

    fresh._compute_rows = no_computing  # type: ignore[method-assign]
    fresh.consolidate(lm, [EDIT, second])
    assert all(torch.equal(v, edited[k]) for k, v in lm.model.state_dict().items())


def test_a_stopped_forward_does_not_leak_into_the_next(lm: LoadedModel) -> None:
    """The edited prompt's forward stops between the key and the value block; a pass over
    another prompt that resumes above the key block must not receive the edit's value."""
    editor = MemoryEditor(**OPTIONS)
    editor.prepare_model(lm)
    other = lm.tokenizer(FACTS[1][0], return_tensors="pt")
    entering = layer_input(lm.model, lm.adapter, 2, other.input_ids, other.attention_mask)
    clean = forward_from_layer(lm.model, lm.adapter, 2, entering, other.attention_mask)
    editor.apply(lm, [EDIT])
    edited = lm.tokenizer(EDIT.prompt, return_tensors="pt")
    run_until(lm.model, lm.adapter.layers(lm.model)[1], input_ids=edited.input_ids)
    assert memory_of(lm)._pending is not None  # the edit fired and waits for block 2
    resumed = forward_from_layer(lm.model, lm.adapter, 2, entering, other.attention_mask)
    assert torch.equal(resumed, clean)


def test_the_bench_resets_the_memory_between_methods(tmp_path: Path) -> None:
    """The memory is attached before the bench copies the base weights, so its rows are reset
    like any parameter and the run's other methods see an empty one."""
    result = run_bench(
        "zsre",
        ["memory", "none"],
        n_edits=4,
        batch_size=2,
        turn_size=2,
        model=tiny_loaded("llama"),
        out_dir=tmp_path,
        data_dir=FIXTURE,
        eval_config=EvalConfig(fluency_prompts=1, fluency_new_tokens=4),
        editor_options={"memory": OPTIONS},
        progress=False,
        command="test",
        unrelated=(LocalityProbe("The sky on a clear day is", "blue", "unrelated"),),
        unrelated_source="test",
    )
    memory = result["methods"]["memory"]
    assert memory["summary"]["refused"] == 0
    assert len(memory["touched_parameters"]) == 7
    assert result["methods"]["none"]["summary"]["unrelated_kept"] == 1.0


def test_a_row_the_prompt_falls_short_of_takes_the_prompts_cosine_down_to_the_floor(
    lm: LoadedModel,
) -> None:
    """No prompt reaches a threshold of 1.0 (its key is averaged over prefixed contexts), so
    the row's threshold becomes the prompt's own cosine less 0.01, and the edit takes; with a
    floor above that cosine, the row keeps 1.0 and the edit does not take at the prompt."""
    editor = MemoryEditor(**{**OPTIONS, "threshold": 1.0, "threshold_floor": 0.5})
    editor.apply(lm, [EDIT])
    memory = memory_of(lm)
    [row] = memory.used_rows().tolist()
    assert 0.5 <= float(memory.thresholds[row]) < 1.0
    assert _answer(lm, EDIT.prompt) == EDIT.target_new
    fresh = tiny_loaded("llama")
    fresh.model.load_state_dict(lm.model.state_dict(), strict=False)
    strict = MemoryEditor(**{**OPTIONS, "threshold": 1.0, "threshold_floor": 0.9999})
    strict.apply(fresh, [EDIT])
    [row] = memory_of(fresh).used_rows().tolist()
    assert float(memory_of(fresh).thresholds[row]) == 1.0


def test_the_row_cache_keeps_only_the_most_recently_used() -> None:
    cache = RowCache(limit=2)
    rows = {name: (torch.full((1,), float(i)),) for i, name in enumerate("abc")}
    cache.put("a", rows["a"])
    cache.put("b", rows["b"])
    assert cache.get("a") is rows["a"]  # "a" is now the most recent
    cache.put("c", rows["c"])
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2


def test_a_row_with_a_lead_fires_only_where_its_lead_comes_first() -> None:
    """Row 0 needs its lead key 1 token back, row 1 2 tokens back; row 2 has no lead."""
    memory = FactMemory(key_width=3, value_width=2, capacity=3, key_layer=0, value_layer=0)
    name, lead, other = torch.eye(3)
    with torch.no_grad():
        memory.keys[:] = torch.stack([name, name, name])
        memory.thresholds[:] = 0.9
        memory.lead_keys[:2] = lead
        memory.lead_thresholds[:2] = 0.9
        memory.lead_offsets[:2] = torch.tensor([1.0, 2.0])
    # Packed sequences: "lead name", "other name", "name", "lead other name", "lead name".
    acts = torch.stack([lead, name, other, name, name, lead, other, name, lead, name])[None]
    positions = torch.tensor([[0, 1, 0, 1, 0, 0, 1, 2, 0, 1]])
    fired = memory.fired(acts, positions)[0]  # (10, 3)
    assert fired[1].tolist() == [True, False, True]  # its lead 1 back
    assert fired[3].tolist() == [False, False, True]  # another token before it
    assert fired[4].tolist() == [False, False, True]  # a sequence's first token
    assert fired[7].tolist() == [False, True, True]  # its lead 2 back
    assert fired[9].tolist() == [True, False, True]  # 2 back is the previous sequence
    # Prefix-sharing packing: "lead name" and "lead other name" share the lead (index 0).
    shared = memory.fired(
        torch.stack([lead, name, other, name])[None], torch.tensor([[0, 1, 1, 2]])
    )[0]
    assert shared[1].tolist() == [True, False, True]  # index 0 is 1 back in its sequence
    assert shared[3].tolist() == [False, True, True]  # index 0 is 2 back, not index 1
    alone = memory.fired(acts[:, 1:2], torch.tensor([[5]]))[0]  # decoded alone: no lead in view
    assert alone.tolist() == [[False, False, True]]


def test_a_subject_of_several_tokens_gets_a_lead_and_one_token_none(lm: LoadedModel) -> None:
    editor = MemoryEditor(**OPTIONS)
    several = EditRequest("e2", "Toko Yasuda plays the", "Toko Yasuda", "guitar")
    keys, _, thresholds, lead_keys, lead_thresholds, offsets = editor.rows(lm, [EDIT, several])
    assert float(lead_thresholds[0]) == 0 and float(lead_keys[0].abs().sum()) == 0
    assert offsets[:, 0].tolist() == [0, 4]  # "To|ko| |Yas|uda": first to last token
    assert float(thresholds[1]) >= editor.config.threshold_floor
    assert 0 < float(lead_thresholds[1]) <= editor.config.lead_threshold
    assert abs(float(lead_keys[1].norm()) - 1) < 1e-5
    off = MemoryEditor(**OPTIONS, lead_threshold=0.0)
    assert [float(t[0]) for t in off.rows(lm, [several])[4:]] == [0.0, 0.0]

"""The trained SmolLM2 editor that ships in editors/smollm2/ loads and makes one edit take."""

import pytest
import torch

from editing.emsedit.checkpoint import SHIPPED_DIR, load_editor
from editing.emsedit.editor import EMSEditEditor
from editing.requests import EditRequest
from editing.scoring import TeacherForcedScorer

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


def test_shipped_checkpoint_is_small_and_complete():
    folder = SHIPPED_DIR / "smollm2"
    loaded = load_editor(folder)
    assert loaded.meta["model"]["name"] == "smollm2"
    assert (folder / "README.md").is_file()
    assert (folder / "editor.safetensors").stat().st_size < 16 * 2**20
    assert not (folder / "train_state.json").exists()


def test_one_edit_of_a_known_fact_takes(smollm2_paths):
    from editing.models import load_model

    lm = load_model("smollm2", paths=smollm2_paths)
    request = EditRequest(
        "demo", "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"
    )
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    pair = [(request.prompt, request.target_new)]
    [before] = scorer.score(pair)
    editor = EMSEditEditor(SHIPPED_DIR / "smollm2")
    result = editor.apply(lm, [request])
    try:
        [after] = scorer.score(pair)
    finally:
        editor.undo(lm, result)
    assert not before.all_correct
    assert after.all_correct, (before.nll, after.nll)
    assert torch.isfinite(torch.tensor(after.nll))

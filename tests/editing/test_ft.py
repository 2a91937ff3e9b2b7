"""FT-L on a tiny model: the target becomes the argmax, computing is pure, undo is exact."""

import pytest
import torch

from editing.editors.base import EditError
from editing.editors.ft import FineTuneL, FTConfig
from editing.registry import EDITORS, get_editor
from editing.requests import EditRequest
from editing.scoring import TeacherForcedScorer
from editing.tiny import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = EditRequest("r0", "The capital of France is", "France", "Rome")
STRONG = FTConfig(layer=2, norm_constraint=0.5, lr=0.05, num_steps=25)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ft_makes_the_target_the_argmax_and_undo_restores(family):
    lm = tiny_loaded(family)
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    [pre] = scorer.score([(REQUEST.prompt, REQUEST.target_new)])
    assert not pre.all_correct

    editor = FineTuneL(STRONG)
    deltas = editor.compute_deltas(lm, [REQUEST])
    for name, value in lm.model.state_dict().items():  # computing changed nothing
        assert torch.equal(value, before[name]), name
    [key] = deltas
    assert key == lm.adapter.weight_name(lm.adapter.roles()[-1], 2)
    assert float(deltas[key].abs().max()) <= STRONG.norm_constraint + 1e-7

    result = editor.apply(lm, [REQUEST])
    [post] = scorer.score([(REQUEST.prompt, REQUEST.target_new)])
    assert post.all_correct
    assert result.info["layer"] == 2 and result.info["nll_end"] < result.info["nll_start"]

    editor.undo(lm, result)
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_ft_is_deterministic():
    lm = tiny_loaded("llama")
    a = FineTuneL(STRONG).compute_deltas(lm, [REQUEST])
    b = FineTuneL(STRONG).compute_deltas(lm, [REQUEST])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_registry_and_config_checks():
    assert EDITORS["ft"] is FineTuneL and EDITORS["none"].name == "none"
    assert get_editor("ft", num_steps=3).config.num_steps == 3
    assert get_editor("none").compute_deltas(tiny_loaded("llama"), [REQUEST]) == {}
    assert FTConfig().resolved_layer(30) == 20
    with pytest.raises(ValueError, match="norm_constraint"):
        FTConfig(norm_constraint=0)
    with pytest.raises(EditError, match="does not exist"):
        FTConfig(layer=9).resolved_layer(4)


@pytest.mark.smollm2
def test_ft_edits_one_zsre_fact_on_smollm2(smollm2_paths):
    from editing.models import load_model

    lm = load_model("smollm2", paths=smollm2_paths)
    request = EditRequest(
        "zsre-knowedit-0",
        "Which family does Epaspidoceras belong to?",
        "Epaspidoceras",
        "Noctuidae",
    )
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    assert scorer.resumable
    before = lm.model.state_dict()[lm.adapter.weight_name(lm.adapter.roles()[-1], 20)].clone()
    editor = get_editor("ft")
    result = editor.apply(lm, [request])
    [post] = scorer.score([(request.prompt, request.target_new)])
    assert post.token_accuracy >= 0.75
    editor.undo(lm, result)
    after = lm.model.state_dict()[lm.adapter.weight_name(lm.adapter.roles()[-1], 20)]
    assert torch.equal(after, before)


def test_consolidate_fits_the_live_set_jointly_under_one_bound():
    lm = tiny_loaded("llama")
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    other = EditRequest("r1", "The capital of Spain is", "Spain", "Oslo")
    editor = FineTuneL(STRONG)
    editor.apply(lm, [REQUEST])
    editor.apply(lm, [other])  # each batch may move the weights by the bound again
    [key] = editor.compute_deltas(lm, [REQUEST])
    assert float((lm.model.state_dict()[key] - base[key]).abs().max()) > STRONG.norm_constraint

    lm.model.load_state_dict(base)  # the caller resets to the base weights
    result = editor.consolidate(lm, [REQUEST, other])
    assert float((lm.model.state_dict()[key] - base[key]).abs().max()) <= STRONG.norm_constraint
    assert result.info["steps"] <= STRONG.consolidate_steps
    scorer = TeacherForcedScorer(lm.model, lm.tokenizer, lm.adapter)
    assert all(
        s.all_correct for s in scorer.score([(r.prompt, r.target_new) for r in (REQUEST, other)])
    )

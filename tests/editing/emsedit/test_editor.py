import pytest
import torch

from editing.editors.base import EditError
from editing.emsedit.editor import EMSEditEditor
from editing.emsedit.keys import answer_loss, tokenize_pairs
from editing.registry import get_editor
from editing.requests import continuation
from editing.tiny import tiny_loaded
from tests.editing.emsedit.conftest import make_requests, tiny_config


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _assert_same(lm, before):
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_registered():
    assert isinstance(get_editor("emsedit"), EMSEditEditor)
    assert EMSEditEditor.needs_training and EMSEditEditor.supports_batch


def test_untrained_net_with_step_size_zero_changes_nothing():
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    editor = EMSEditEditor.from_config(tiny_config(lr_init=0.0))
    result = editor.apply(lm, make_requests()[:2])
    assert result.deltas and all(torch.count_nonzero(d) == 0 for d in result.deltas.values())
    _assert_same(lm, before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_compute_leaves_the_model_unchanged_and_undo_is_exact(family):
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    editor = EMSEditEditor.from_config(tiny_config())
    deltas = editor.compute_deltas(lm, make_requests()[:3])
    _assert_same(lm, before)
    for key, delta in deltas.items():
        assert delta.shape == before[key].shape and delta.dtype == torch.float32
        assert delta.is_contiguous() and delta.abs().sum() > 0
    result = editor.apply(lm, make_requests()[:3])
    assert any(not torch.equal(lm.model.state_dict()[k], before[k]) for k in result.deltas)
    editor.undo(lm, result)
    _assert_same(lm, before)


def test_editing_is_deterministic_bit_for_bit():
    torch.use_deterministic_algorithms(True)
    try:
        weights = []
        for _ in range(2):
            lm = tiny_loaded("llama")
            editor = EMSEditEditor.from_config(tiny_config())
            editor.apply(lm, make_requests()[:2])
            editor.apply(lm, make_requests()[2:4])  # sequential: the second sees the first
            weights.append(_snapshot(lm))
        for name, value in weights[0].items():
            assert torch.equal(value, weights[1][name]), name
    finally:
        torch.use_deterministic_algorithms(False)


def test_an_untrained_small_step_moves_towards_the_target():
    lm = tiny_loaded("llama")
    requests = make_requests()[:2]
    batch = tokenize_pairs(
        lm.tokenizer, [(r.prompt, continuation(r.target_new)) for r in requests], lm.device
    )
    with torch.no_grad():
        before = float(answer_loss(lm.model, batch))
        EMSEditEditor.from_config(tiny_config(lr_init=1.0e-3)).apply(lm, requests)
        after = float(answer_loss(lm.model, batch))
    assert after < before


def test_steps_override_and_limits():
    lm = tiny_loaded("llama")
    one = EMSEditEditor.from_config(tiny_config(), steps=1).compute_deltas(lm, make_requests()[:1])
    two = EMSEditEditor.from_config(tiny_config()).compute_deltas(lm, make_requests()[:1])
    assert any(not torch.equal(one[k], two[k]) for k in one)
    with pytest.raises(EditError, match="step networks"):
        EMSEditEditor.from_config(tiny_config(), steps=3).compute_deltas(lm, make_requests()[:1])
    batch_mode = EMSEditEditor.from_config(tiny_config(mode="batch"), steps=3)
    assert batch_mode.compute_deltas(lm, make_requests()[:2])
    with pytest.raises(EditError, match="out of range"):
        EMSEditEditor.from_config(
            tiny_config().replace(
                modules=tiny_config().modules[:1] + (type(tiny_config().modules[0])("up", (9,)),)
            )
        ).compute_deltas(lm, make_requests()[:1])


def _numbered_requests(n: int) -> list:
    from editing.requests import EditRequest

    words = ["Rome", "Paris", "guitar", "Bill Gates", "French", "Madrid", "tennis", "Oslo"]
    return [
        EditRequest(f"n{i}", f"Fact number {i} is about", f"number {i}", words[i % len(words)])
        for i in range(n)
    ]


def test_a_request_gets_the_same_value_gradients_alone_as_inside_a_batch_of_20():
    from editing.emsedit.editor import edit_pairs, resolve_modules
    from editing.emsedit.keys import capture_keys_and_grads

    lm = tiny_loaded("llama")
    config = tiny_config(lm_batch_size=8)
    modules = {m.name: dict(lm.model.named_modules())[m.name] for m in resolve_modules(lm, config)}
    requests = _numbered_requests(20)

    def rows_of_first(batch):
        cache = capture_keys_and_grads(
            lm.model, modules, lm.tokenizer, edit_pairs(batch), 8, lm.device, config.grad_rows
        )
        n_first = len(lm.tokenizer(" " + batch[0].target_new, add_special_tokens=False).input_ids)
        return {name: grads[:n_first] for name, (_, grads) in cache.items()}

    alone, together = rows_of_first(requests[:1]), rows_of_first(requests)
    for name in alone:
        assert torch.allclose(alone[name], together[name], rtol=1e-4, atol=1e-7), name


def test_subject_keys_are_the_inputs_at_the_subjects_last_token():
    from editing.emsedit.editor import edit_pairs, key_positions, resolve_modules
    from editing.emsedit.keys import capture_keys_and_grads
    from editing.hooks import capture_inputs

    lm = tiny_loaded("llama")
    config = tiny_config(key_position="subject")
    requests = make_requests()[:3]
    modules = {m.name: dict(lm.model.named_modules())[m.name] for m in resolve_modules(lm, config)}
    positions = key_positions(lm, config, requests)
    cache = capture_keys_and_grads(
        lm.model, modules, lm.tokenizer, edit_pairs(requests), 2, lm.device, 20, positions
    )
    for request, position, row in zip(requests, positions, range(3), strict=True):
        prefix = lm.tokenizer.decode(lm.tokenizer(request.prompt).input_ids[: position + 1])
        assert prefix.endswith(request.subject)
        ids = lm.tokenizer(request.prompt, return_tensors="pt").input_ids
        with torch.no_grad(), capture_inputs(modules) as inputs:
            lm.model(ids)
        for name, (keys, grads) in cache.items():
            assert keys.shape[0] == len(requests) and grads.shape[0] == len(requests)
            assert torch.allclose(keys[row], inputs[name][0, position].float(), atol=1e-5)


def test_an_untrained_editor_from_a_method_spec_edits_the_named_site():
    lm = tiny_loaded("llama")
    requests = make_requests()[:2]
    editor = get_editor("emsedit:untrained=true:modules=down1-2:key_position=subject:lr_init=0.01")
    assert editor.config.key_position == "subject"
    deltas = editor.compute_deltas(lm, requests)
    names = {lm.adapter.weight_name(lm.adapter.roles()[-1], layer) for layer in (1, 2)}
    assert set(deltas) == names and all(d.abs().sum() > 0 for d in deltas.values())
    with pytest.raises(EditError, match="untrained=true"):
        EMSEditEditor(modules="down1-2")
    with pytest.raises(EditError, match="ROLE FIRST-LAST"):
        EMSEditEditor(untrained=True, modules="mlp1-2")

"""The safeguards around an editor's delta, on a tiny llama with an untrained EMSEdit editor."""

from __future__ import annotations

import pytest
import torch

from editing.editors.base import EditError
from editing.emsedit.editor import EMSEditEditor
from editing.keystats import KeyStatistics
from editing.registry import get_editor, parse_method
from editing.safeguard_config import SafeguardConfig
from editing.safeguards import GuardedEditor
from editing.tiny import tiny_loaded
from tests.editing.conftest import small_key_statistics
from tests.editing.emsedit.conftest import make_requests, tiny_config

UP = "model.layers.2.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
CORPUS = "The capital of France is Paris. Toko Yasuda plays the guitar.\n" * 200


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def stats(tmp_path_factory: pytest.TempPathFactory) -> KeyStatistics:
    return small_key_statistics(tmp_path_factory.mktemp("stats"), CORPUS)


def guarded(stats: KeyStatistics, **flags) -> GuardedEditor:
    inner = EMSEditEditor.from_config(tiny_config(lr_init=1.0e-2))
    config = SafeguardConfig(
        **{"rewind": False, "mask": False, "preserve": False, "normguard": False, **flags}
    )
    return GuardedEditor(inner, config, stats=stats)


def weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def test_neuron_mask_leaves_unselected_neurons_bit_identical(stats):
    lm = tiny_loaded("llama")
    before = weights(lm)
    editor = guarded(stats, mask=True, mask_p=0.5)
    result = editor.apply(lm, make_requests()[:2])
    after = weights(lm)
    up_rows_changed = (after[UP] != before[UP]).any(dim=1)  # (d_out,) rows = up's neurons
    down_cols_changed = (after[DOWN] != before[DOWN]).any(dim=0)  # (d_in,) columns = down's
    assert 0 < int(up_rows_changed.sum()) < up_rows_changed.numel()
    assert 0 < int(down_cols_changed.sum()) < down_cols_changed.numel()
    assert torch.equal(
        result.deltas[UP][~up_rows_changed], torch.zeros_like(result.deltas[UP][~up_rows_changed])
    )
    assert 0.0 < float(result.info["neurons_kept"]) < 1.0


def test_compute_is_pure_and_undo_restores_weights_and_memory(stats):
    lm = tiny_loaded("llama")
    before = weights(lm)
    editor = guarded(stats, mask=True, preserve=True, remember_edits=True)
    editor.compute_deltas(lm, make_requests()[:2])
    assert all(torch.equal(v, before[k]) for k, v in weights(lm).items())
    first = editor.apply(lm, make_requests()[:2])
    memory = {k: v.clone() for k, v in editor.memory.items()}
    mid = weights(lm)
    second = editor.apply(lm, make_requests()[2:4])
    assert any(not torch.equal(editor.memory[k], memory[k]) for k in memory)
    editor.undo(lm, second)
    assert all(torch.equal(v, mid[k]) for k, v in weights(lm).items())
    assert all(torch.equal(editor.memory[k], memory[k]) for k in memory)
    editor.undo(lm, first)
    assert all(torch.equal(v, before[k]) for k, v in weights(lm).items())
    assert editor.memory == {}


def test_refit_reproduces_the_proposal_on_the_edit_keys_without_preservation_terms(stats):
    """With λ = 0 and no memory the refit is the minimum-norm ΔW with ΔW U = ΔW_h U."""
    lm = tiny_loaded("llama")
    editor = guarded(stats, preserve=True, preserve_lambda=0.0, remember_edits=False)
    requests = make_requests()[:2]
    proposal = editor.inner.compute_deltas(lm, requests)
    deltas = editor.compute_deltas(lm, requests)
    modules = {n: dict(lm.model.named_modules())[n.removesuffix(".weight")] for n in deltas}
    keys, _ = editor._capture(lm, editor._resolve(lm, deltas), requests)
    for name in modules:
        intended = proposal[name].double() @ keys[name]  # (d_out, n)
        written = deltas[name].double() @ keys[name]
        assert torch.allclose(written, intended, rtol=1e-4, atol=1e-6 * intended.abs().max())
        assert deltas[name].norm() <= proposal[name].norm() * (1 + 1e-6)


def test_preservation_keeps_generic_keys_closer_than_the_raw_proposal(stats):
    lm = tiny_loaded("llama")
    requests = make_requests()[:2]
    raw = guarded(stats).compute_deltas(lm, requests)
    kept = guarded(stats, preserve=True, preserve_lambda=50.0).compute_deltas(lm, requests)
    c0 = stats.c0(lm, 2, role=__import__("editing.adapters").adapters.MlpRole.UP)

    # tr(Δ C0 Δᵀ): how much the update moves outputs on ordinary text, on average.
    def generic_change(delta):
        d = delta.double()
        return float(torch.trace(d @ c0 @ d.T))

    assert generic_change(kept[UP]) < generic_change(raw[UP])


def test_norm_guard_refuses_a_large_update_and_says_why(stats):
    lm = tiny_loaded("llama")
    before = weights(lm)
    editor = guarded(stats, normguard=True, max_delta_norm=1e-9)
    with pytest.raises(EditError, match=r"update norm is .* \(limit"):
        editor.apply(lm, make_requests()[:2])
    assert all(torch.equal(v, before[k]) for k, v in weights(lm).items())


def test_norm_guard_refuses_an_edit_the_mask_weakens_too_much(stats):
    lm = tiny_loaded("llama")
    editor = guarded(stats, normguard=True, mask=True, mask_p=0.01, max_unexplained=0.05)
    with pytest.raises(EditError, match="intended change undone"):
        editor.apply(lm, make_requests()[:2])


def test_rewind_computes_the_proposal_on_the_original_weights(stats):
    """After other edits, a rewound editor proposes exactly what it proposes on the base."""
    lm = tiny_loaded("llama")
    request = make_requests()[4:5]
    editor = guarded(stats, rewind=True)
    on_base = editor.inner.compute_deltas(lm, request)
    editor.apply(lm, make_requests()[:2])  # first edit: the wrapper records the originals
    editor.apply(lm, make_requests()[2:4])
    drifted_plain = editor.inner.compute_deltas(lm, request)
    rewound = editor.compute_deltas(lm, request)
    assert any(not torch.equal(drifted_plain[k], on_base[k]) for k in on_base)
    assert all(torch.equal(rewound[k], on_base[k]) for k in on_base)


def test_reset_memory_rebuilds_what_sequential_edits_accumulated(stats):
    lm = tiny_loaded("llama")
    editor = guarded(stats, rewind=True, preserve=True)
    requests = make_requests()
    for start in range(0, 6, 2):
        editor.apply(lm, requests[start : start + 2])
    accumulated = {k: v.clone() for k, v in editor.memory.items()}
    editor.reset_memory(lm, requests)
    assert set(editor.memory) == set(accumulated)
    for name, value in accumulated.items():
        # Equal up to float32 rounding: the padding of a batch changes the order of sums.
        assert torch.allclose(editor.memory[name], value, rtol=1e-5, atol=1e-5)


def test_guarded_editing_is_deterministic(stats):
    runs = []
    for _ in range(2):
        lm = tiny_loaded("llama")
        editor = guarded(stats, rewind=True, mask=True, preserve=True)
        editor.apply(lm, make_requests()[:2])
        editor.apply(lm, make_requests()[2:4])
        runs.append(weights(lm))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_method_specs():
    assert parse_method("emsedit+mask+preserve:steps=1:device=cpu") == (
        "emsedit",
        ("mask", "preserve"),
        {"steps": 1, "device": "cpu"},
    )
    editor = get_editor("ft+normguard")
    assert isinstance(editor, GuardedEditor)
    assert editor.config.normguard and not editor.config.mask
    assert get_editor("emsedit:steps=1").steps_override == 1
    everything = get_editor("emsedit+safeguards").config
    assert everything.mask and everything.preserve
    assert everything.rewind and everything.normguard
    tuned = get_editor("emsedit+mask:mask_p=0.9:steps=1")
    assert tuned.config.mask_p == 0.9 and tuned.inner.steps_override == 1
    with pytest.raises(EditError, match="unknown safeguard"):
        get_editor("emsedit+magic")
    with pytest.raises(EditError, match="key=value"):
        get_editor("emsedit:steps")


def test_propose_leaves_the_weights_and_apply_writes_exactly_the_proposal(stats):
    """Compute returns a proposal, apply writes it: nothing is carried on the editor between."""
    lm = tiny_loaded("llama")
    requests = make_requests()
    editor = guarded(stats, rewind=True, mask=True, preserve=True, preserve_lambda=50.0)
    editor.apply(lm, requests[:2])  # later edits rewind to the originals
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    proposal = editor.propose(lm, requests[2:4])
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(proposal.memory_keys) == set(proposal.deltas)
    result = editor.apply(lm, requests[2:4])
    for name, delta in proposal.deltas.items():
        assert torch.equal(result.deltas[name], delta)
        assert torch.equal(lm.model.state_dict()[name], before[name] + delta)


def test_keys_on_the_originals_need_no_write(stats):
    """The functional forward on the original weights gives the keys a rewound model gives."""
    lm = tiny_loaded("llama")
    requests = make_requests()
    editor = guarded(stats, rewind=True, preserve=True, preserve_lambda=50.0)
    editor.apply(lm, requests[:2])
    sites = editor._sites
    assert sites
    functional, _ = editor._capture(lm, sites, requests[2:4], editor._originals_of(sites))
    with editor._rewound(lm):
        rewound, _ = editor._capture(lm, sites, requests[2:4])
    now, _ = editor._capture(lm, sites, requests[2:4])
    assert all(torch.equal(functional[name], rewound[name]) for name in sites)
    # A matrix's own input does not see its own edit, only the edits of the layers below it.
    assert any(not torch.equal(functional[name], now[name]) for name in sites)

"""The value loss recomputes only the positions from each row's subject on, and gives the same
losses, margins and gradients as a pass over whole rows; a margin stop ends each request once
its target leads every value prompt by that margin."""

from __future__ import annotations

import dataclasses

import torch

from editing.checks import needs_word_end, word_continuing_tokens
from editing.hooks import frozen_parameters
from editing.models import LoadedModel
from editing.nse import PRESETS
from editing.nse.keys import ValueObjective, compute_targets
from editing.requests import EditRequest
from editing.tiny import tiny_tokenizer

CONFIG = dataclasses.replace(PRESETS["tiny"], value_prefixes=2, kl_factor=0.5)
REQUESTS = [
    EditRequest("mid", "The twin city of Paris", "Paris", "Japan"),
    EditRequest("first", "Rome is the twin city of", "Rome", "Paris"),
    EditRequest("long", "The twin city of Japan", "Japan", "Rome Paris"),
]
LEARNABLE = [  # prompts that end on the subject, as the tiny model needs (see conftest)
    EditRequest("e1", "The twin city of Paris", "Paris", "Japan"),
    EditRequest("e2", "The twin city of Japan", "Japan", "Rome"),
    EditRequest("e3", "The twin city of Rome", "Rome", "Paris"),
]


def _loss_and_grad(
    objective: ValueObjective, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    leaf = delta.clone().requires_grad_(True)
    with torch.enable_grad():
        total, _, margin = objective.losses(leaf, list(range(len(objective))))
        total.sum().backward()
    assert leaf.grad is not None
    return total.detach(), margin, leaf.grad


def test_suffix_pass_matches_whole_rows(trained_lm: LoadedModel) -> None:
    with frozen_parameters(trained_lm.model):
        suffix = ValueObjective(trained_lm, REQUESTS, CONFIG.z_layer, CONFIG)
        whole = ValueObjective(trained_lm, REQUESTS, CONFIG.z_layer, CONFIG)
        whole.upper.prefix = None  # the fallback: every call runs whole rows
        assert suffix.upper.prefix is not None
        starts = suffix.upper.subject_cols
        assert int(starts.min()) < int(starts.max())  # subjects at different positions
        delta = 3.0 * torch.randn(len(REQUESTS), trained_lm.model.config.hidden_size)
        zero = torch.zeros_like(delta)
        for objective in (suffix, whole):  # the first call fixes the KL reference at δ = 0
            _loss_and_grad(objective, zero)
        loss_s, margin_s, grad_s = _loss_and_grad(suffix, delta)
        loss_w, margin_w, grad_w = _loss_and_grad(whole, delta)
    assert torch.allclose(loss_s, loss_w, atol=1e-5)
    assert torch.allclose(margin_s, margin_w, atol=1e-5)
    assert torch.allclose(grad_s, grad_w, rtol=1e-4, atol=1e-5)
    assert float(grad_s.norm()) > 0


def test_margin_stop_ends_each_request_once_its_target_leads(trained_lm: LoadedModel) -> None:
    config = dataclasses.replace(CONFIG, early_stop_loss=0.0, stop_margin=0.5)
    targets = compute_targets(trained_lm, LEARNABLE, config.z_layer, config)
    assert all(t.steps < config.v_num_grad_steps - 1 for t in targets)  # none ran out of steps
    objective = ValueObjective(trained_lm, LEARNABLE, config.z_layer, config)
    delta = torch.stack([t.z - t.h_init for t in targets])
    with frozen_parameters(trained_lm.model), torch.no_grad():
        _, _, margins = objective.losses(delta, list(range(len(LEARNABLE))))
    assert bool((margins >= 0.5).all())
    later = compute_targets(
        trained_lm, LEARNABLE, config.z_layer, dataclasses.replace(config, stop_margin=2.0)
    )
    assert sum(t.steps for t in later) > sum(t.steps for t in targets)


def test_word_continuing_tokens_follow_the_judge() -> None:
    tokenizer = tiny_tokenizer()
    mask = word_continuing_tokens(tokenizer, len(tokenizer) + 2)
    ids = {tokenizer.decode([i]): i for i in range(len(tokenizer))}
    assert mask[ids["A"]] and mask[ids["0"]]  # "Paris" + "A" is not "Paris"
    assert not mask[ids[" Paris"]] and not mask[ids["."]] and not mask[ids["<|endoftext|>"]]
    assert not mask[len(tokenizer) :].any()  # ids the tokenizer lacks end the word
    assert needs_word_end("Paris") and not needs_word_end("Paris.") and not needs_word_end("東京")


def test_the_end_of_word_term_weighs_the_token_after_the_target(trained_lm: LoadedModel) -> None:
    """With ``end_of_word`` a target ending in a letter gains the NLL of ending the word after
    it, and its margin is at most the target tokens' own; a target ending in "." is unchanged."""
    requests = [REQUESTS[0], EditRequest("dot", "The twin city of Rome", "Rome", "Paris.")]
    delta = 2.0 * torch.randn(len(requests), trained_lm.model.config.hidden_size)
    results = []
    with frozen_parameters(trained_lm.model):
        for end in (False, True):
            objective = ValueObjective(
                trained_lm, requests, CONFIG.z_layer, CONFIG.replace(end_of_word=end)
            )
            _loss_and_grad(objective, torch.zeros_like(delta))
            results.append(_loss_and_grad(objective, delta))
    (loss_off, margin_off, _), (loss_on, margin_on, _) = results
    assert float(loss_on[0]) != float(loss_off[0])
    assert float(margin_on[0]) <= float(margin_off[0])
    assert torch.allclose(loss_on[1], loss_off[1]) and torch.equal(margin_on[1], margin_off[1])


def test_requests_in_chunks_find_the_values_one_forward_finds(trained_lm: LoadedModel) -> None:
    """Each chunk's backward runs before the next chunk's forward (the graph of one chunk is
    held, not the batch's); every request still gets its own gradient and stops on its own."""
    whole = compute_targets(
        trained_lm, LEARNABLE, CONFIG.z_layer, dataclasses.replace(CONFIG, value_chunk=8)
    )
    alone = compute_targets(
        trained_lm, LEARNABLE, CONFIG.z_layer, dataclasses.replace(CONFIG, value_chunk=1)
    )
    assert [t.steps for t in alone] == [t.steps for t in whole]
    for a, w in zip(alone, whole, strict=True):
        assert torch.allclose(a.z, w.z, atol=1e-4)

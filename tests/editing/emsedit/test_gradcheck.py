"""The closed-form (implicit) backprop through the ridge solve equals autograd, over K steps."""

import torch
from torch.func import functional_call

from editing.emsedit.editor import WeightState, build_group, edit_pairs, resolve_modules, run_steps_
from editing.emsedit.keys import IGNORE, tokenize_pairs
from editing.emsedit.shift import ridge_shift, value_diffs
from editing.emsedit.train import backprop_steps, meta_grads, rephrase_pairs
from editing.hooks import frozen_parameters
from editing.tiny import tiny_loaded
from tests.editing.emsedit.conftest import make_requests, tiny_config


def _perturbed_group(modules, config):
    group = build_group(modules, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the identity init so every parameter matters
        for p in group.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return group


def test_implicit_gradient_matches_autograd_for_both_step_nets():
    lm = tiny_loaded("llama")
    config = tiny_config()
    requests = make_requests()[:3]
    modules = resolve_modules(lm, config)
    group = _perturbed_group(modules, config)
    reg = 0.25
    state = WeightState(lm, modules)
    with frozen_parameters(lm.model):
        records = run_steps_(
            lm,
            group,
            config,
            state,
            edit_pairs(requests),
            steps=2,
            update_normalizer=True,
            device=lm.device,
        )
        gamma, _, _ = meta_grads(lm, config, state, modules, requests, None, reg)
        backprop_steps(group, config, records, gamma)
    implicit = {n: p.grad.clone() for n, p in group.named_parameters()}
    group.zero_grad(set_to_none=True)
    state.restore_()

    # Reference: differentiate the whole chain with autograd (solve included), same cached K, G.
    total = {m.name: 0 for m in modules}
    for record in records:
        for name, (keys, grads) in record.cache.items():
            net, index = group.net(record.net_index, name)
            values = value_diffs(net, index, keys, grads, config.hypernet_batch_size)
            total[name] = total[name] + ridge_shift(keys, values, net.ridge(index))  # (d_in, d_out)
    params = {}
    for m in modules:
        weight_out_in = state.base[m.name] + total[m.name].T  # (d_out, d_in)
        params[m.weight_key] = lm.adapter.to_stored(weight_out_in)
    pairs = rephrase_pairs(requests)
    loss = sum(reg * (total[m.name] ** 2).sum() for m in modules)
    for start in range(0, len(pairs), config.lm_batch_size):
        batch = tokenize_pairs(lm.tokenizer, pairs[start : start + config.lm_batch_size], lm.device)
        logits = functional_call(
            lm.model,
            params,
            kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
        ).logits  # (B, T, V)
        loss = loss + torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE
        )
    loss.backward()

    checked = 0
    for name, param in group.named_parameters():
        ref = param.grad
        if ref is None or ref.abs().max() == 0:
            assert implicit[name].abs().max() < 1e-6, name
            continue
        err = (implicit[name] - ref).norm() / ref.norm()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
        checked += 1
    step_one = [
        n for n, p in group.named_parameters() if n.startswith("nets.1.") and p.grad is not None
    ]
    assert checked > 20 and step_one, "both step nets must receive gradient"

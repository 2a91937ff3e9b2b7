"""Greedy decoding, batched with left padding so every prompt ends at the same position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """The greedy continuation of each prompt (prompt text not included)."""
    ids = greedy_token_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.no_grad()
def greedy_token_ids(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[list[int]]:
    """The greedy continuation of each prompt as token ids, up to and including an end token."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    outputs: list[list[int]] = []
    ends = end_ids(model, tokenizer)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )  # (B, T_prompt + T_new)
            for row in generated[:, enc.input_ids.shape[1] :].tolist():
                # after an end token generate pads the row: keep the end token, drop the rest
                stop = next((i for i, t in enumerate(row) if t in ends), len(row) - 1)
                outputs.append(row[: stop + 1])
    finally:
        tokenizer.padding_side = previous_side
    return outputs


def end_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    """Every token id generation stops at (the tokenizer's and the generation config's)."""
    ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ends.add(configured)
    elif configured:
        ends.update(configured)
    return ends

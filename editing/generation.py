"""Greedy decoding, batched with left padding so every prompt ends at the same position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """The greedy continuation of each prompt (prompt text not included)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    outputs: list[str] = []
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
            new_tokens = generated[:, enc.input_ids.shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return outputs

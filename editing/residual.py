"""Running a model from the input of one of its layers, so unchanged lower layers run once.

An editor that changes only layer ``L`` leaves every layer below ``L`` as it was, so the residual
stream entering layer ``L`` is the same before and after the edit. Evaluation (and FT-L training)
can compute that input once and afterwards run only layers ``L..end``: for a mid-depth edit of a
30-layer model that is a third to a half of the work. This works when the first block's input is
exactly what the model's ``inputs_embeds`` argument feeds it (llama, qwen2); GPT-2 adds position
embeddings after ``inputs_embeds``, so there it does not. Instead of a per-family list,
``can_resume`` checks the property numerically on the model itself, and callers fall back to a
full forward pass when it does not hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from editing.adapters import ArchitectureAdapter
from editing.hooks import StopForward

log = logging.getLogger(__name__)

_RESUMABLE_ATTR = "_factkeeper_resumable"


def layer_input(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream entering block ``layer``: (B, T, H). Runs only blocks below it.

    ``attention_mask`` is (B, T), or a prepared (B, 1, T, T) mask with ``position_ids`` (B, T)
    for rows that pack several sequences (``editing.scoring``).
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())
        raise StopForward  # the blocks from here on are not needed

    handle = adapter.layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} was never called")
    return captured[0]  # (B, T, H)


@contextlib.contextmanager
def _only_layers_from(model: nn.Module, adapter: ArchitectureAdapter, start: int) -> Iterator[None]:
    """Temporarily make the model's block list ``blocks[start:]``."""
    parent_path, _, attr = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def forward_from_layer(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    layer: int,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states (after the last norm), (B, T, H), from the input of block ``layer``.

    Positions are counted from 0 as in a full pass (use right padding so they agree) unless
    ``position_ids`` says otherwise.
    """
    with _only_layers_from(model, adapter, layer):
        out = model.base_model(
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    return out.last_hidden_state


def final_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states of a full pass (B, T, H), without computing the vocabulary logits."""
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def can_resume(model: nn.Module, adapter: ArchitectureAdapter, tokenizer: Any) -> bool:
    """Whether resuming from a layer's input reproduces a full pass on this model (cached)."""
    cached = getattr(model, _RESUMABLE_ATTR, None)
    if cached is not None:
        return bool(cached)
    enc = tokenizer(["The capital of France is Paris"], return_tensors="pt").to(
        next(model.parameters()).device
    )
    layer = adapter.num_layers(model) // 2
    with torch.inference_mode():
        full = final_hidden(model, enc.input_ids, enc.attention_mask)
        hidden = layer_input(model, adapter, layer, enc.input_ids, enc.attention_mask)
        resumed = forward_from_layer(model, adapter, layer, hidden, enc.attention_mask)
    ok = bool(torch.allclose(full, resumed, rtol=1e-4, atol=1e-4))
    if not ok:
        log.info("model cannot resume from a layer input; evaluation runs full passes")
    setattr(model, _RESUMABLE_ATTR, ok)
    return ok

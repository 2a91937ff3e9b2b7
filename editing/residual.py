"""Running a model from the input of one of its layers, so unchanged lower layers run once.

An editor that changes only layer ``L`` leaves every layer below ``L`` as it was, so the residual
stream entering layer ``L`` is the same before and after the edit. Evaluation (and FT-L training)
can compute that input once and afterwards run only layers ``L..end``: for a mid-depth edit of a
30-layer model that is a third to a half of the work. This works when the first block's input is
exactly what the model's ``inputs_embeds`` argument feeds it (llama, qwen2); GPT-2 adds position
embeddings after ``inputs_embeds``, so there it does not. Instead of a per-family list,
``can_resume`` checks the property numerically on the model itself, and callers fall back to a
full forward pass when it does not hold.

A change made at one position reaches only that position and later ones, so a pass that adds a
vector at each row's subject can reuse the attention keys and values of the earlier positions
(``PrefixCache``) and recompute the rest (``forward_suffix_from_layer``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

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


@dataclass(frozen=True)
class PrefixCache:
    """Every layer's attention keys and values of each row's positions before its ``start``,
    left-padded to a common length, so a pass can recompute only positions from ``start`` on.

    A change made at a row's ``start`` (e.g. a vector added to a block's output there) cannot
    reach earlier positions of a causal model, so their keys and values are the same in every
    such pass and are taken once from a plain full pass.
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (R, heads, P, head_dim)
    mask: torch.Tensor  # (R, P) 1 where a slot holds a real position
    starts: torch.Tensor  # (R,) first recomputed position of each row

    @classmethod
    def from_cache(cls, cache: Any, starts: torch.Tensor) -> PrefixCache:
        """Positions ``0 .. starts[r] - 1`` of each row of a full pass's ``DynamicCache``."""
        starts = starts.to(torch.long).cpu()
        width = int(starts.max()) if len(starts) else 0
        source = starts[:, None] - width + torch.arange(width)[None, :]  # (R, P), right-aligned
        valid = source >= 0
        source = source.clamp(min=0)
        layers = []
        for layer in cache.layers:
            keys, values = layer.keys, layer.values  # (R, heads, T, head_dim)
            index = source.to(keys.device)[:, None, :, None].expand(
                keys.shape[0], keys.shape[1], width, keys.shape[3]
            )
            keep = valid.to(keys.device)[:, None, :, None]
            layers.append(
                (
                    keys.gather(2, index).masked_fill(~keep, 0.0),
                    values.gather(2, index).masked_fill(~keep, 0.0),
                )
            )
        return cls(tuple(layers), valid.to(torch.long), starts)

    def rows(self, index: torch.Tensor) -> PrefixCache:
        """The same cache for a subset of rows."""
        cpu = index.cpu()
        picked = tuple((k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.layers)
        return PrefixCache(picked, self.mask[cpu], self.starts[cpu])


def forward_suffix_from_layer(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    layer: int,
    hidden: torch.Tensor,
    suffix_mask: torch.Tensor,
    prefix: PrefixCache,
) -> torch.Tensor:
    """Final hidden states (R, Q, H) of positions ``start .. start + Q - 1`` of each row, from
    their input to block ``layer`` (R, Q, H, left-aligned at ``start``), attending to the
    cached earlier positions. The cost is that of the Q recomputed positions only."""
    device = hidden.device
    steps = torch.arange(hidden.shape[1])
    positions = (prefix.starts[:, None] + steps[None, :]).to(device)  # (R, Q)
    mask = torch.cat([prefix.mask.to(device), suffix_mask.to(device)], dim=1)  # (R, P + Q)
    cache = DynamicCache(ddp_cache_data=list(prefix.layers))
    with _only_layers_from(model, adapter, layer):
        out = model.base_model(
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
    return out.last_hidden_state

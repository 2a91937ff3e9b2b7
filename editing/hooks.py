"""Forward hooks as context managers: capture a module's input or output, stop a forward early,
add a vector to a module's output at chosen positions, freeze parameters for a while.

Every hook is removed when its ``with`` block exits, including on an exception, so no hook
outlives the code that needed it (style guide, item 8). Editors, key statistics and safeguards
all capture activations through this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by ``stop_after`` to end a forward pass once the needed module has run."""


def _first_tensor(value: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first item of a tuple output."""
    return value[0] if isinstance(value, tuple) else value


@contextlib.contextmanager
def capture_inputs(
    modules: Mapping[str, nn.Module], *, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of each module on every forward (the last one wins).

    Args:
        modules: name -> module to watch.
        detach: detach the recorded tensors from the graph (the default); keep the graph
            when a caller needs gradients through them.

    Yields:
        A dict filled with name -> input tensor as forwards run.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():

            def hook(_mod: nn.Module, args: tuple, name: str = name) -> None:
                value = args[0]
                captured[name] = value.detach() if detach else value

            handles.append(module.register_forward_pre_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_outputs(
    modules: Mapping[str, nn.Module], *, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the main output tensor of each module on every forward (the last one wins)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():

            def hook(_mod: nn.Module, _args: tuple, output: Any, name: str = name) -> None:
                value = _first_tensor(output)
                captured[name] = value.detach() if detach else value

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Make any forward raise ``StopForward`` as soon as ``module`` has run.

    Use with ``run_until``; hooks registered before this one on the same module still run.
    """

    def hook(_mod: nn.Module, _args: tuple, _output: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, module: nn.Module, **inputs: Any) -> None:
    """Run ``model(**inputs)`` but skip everything after ``module`` (captures fill on the way)."""
    with stop_after(module):
        try:
            model(**inputs)
        except StopForward:
            return


@contextlib.contextmanager
def add_to_output(
    module: nn.Module, rows: torch.Tensor, cols: torch.Tensor, vector: torch.Tensor
) -> Iterator[None]:
    """Add ``vector`` to the module's output at positions ``(rows[i], cols[i])`` on every forward.

    Args:
        module: a module whose main output is (B, T, d).
        rows: (P,) batch indices.
        cols: (P,) token positions, one per row.
        vector: (d,) added at every listed position, or (P, d): one per position (may require
            grad).
    """

    def hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
        hidden = _first_tensor(output)  # (B, T, d)
        bump = torch.zeros_like(hidden)  # (B, T, d)
        bump[rows, cols] = vector.to(hidden.dtype)  # (P, d) <- (P, d) or broadcast (d,)
        shifted = hidden + bump
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off on every parameter, and restore each flag on exit."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])

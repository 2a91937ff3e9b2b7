"""Trained editors on disk: tensors in safetensors, everything else in JSON, nothing pickled.

A checkpoint folder holds ``editor.safetensors`` (hypernetwork parameters and normaliser
buffers) and ``editor.json`` (format tag, resolved config, the model and modules it was trained
for, training provenance). Resumable training adds ``train_state.safetensors`` (Adam moments,
the drifting model's deltas) and ``train_state.json`` (counters); the shipped editor omits them.
Writes go to a temporary file first and are renamed into place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from editing.emsedit.config import ConfigError, EMSEditConfig
from editing.emsedit.nets import HyperNetGroup
from editing.errors import FactkeeperError
from editing.files import atomic_write
from editing.models import LoadedModel
from editing.paths import Paths

log = logging.getLogger(__name__)

FORMAT = "factkeeper-emsedit/1"
WEIGHTS = "editor.safetensors"
META = "editor.json"
TRAIN_WEIGHTS = "train_state.safetensors"
TRAIN_META = "train_state.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# The shipped editors (editors/<model>/): package data, found the same way in a source checkout
# and in an installed wheel.
SHIPPED_DIR = Path(str(resources.files("editors")))


class CheckpointError(FactkeeperError):
    """A checkpoint is missing, not safetensors + JSON, or does not fit the model."""


@dataclass
class LoadedEditor:
    config: EMSEditConfig
    group: HyperNetGroup
    meta: dict[str, Any]


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp)))


def _save_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def save_editor(
    folder: str | Path, config: EMSEditConfig, group: HyperNetGroup, meta: dict[str, Any]
) -> None:
    """Write ``editor.safetensors`` and ``editor.json`` (``meta`` must hold ``modules``)."""
    folder = Path(folder)
    if "modules" not in meta:
        raise CheckpointError("editor metadata needs the modules list (name, d_in, d_out)")
    _save_tensors(folder / WEIGHTS, group.state_dict())
    _save_json(folder / META, {**meta, "format": FORMAT, "config": config.to_dict()})


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing anything else (a pickle is never unpickled)."""
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded, never pickles")
    try:
        with safe_open(str(path), framework="pt"):
            pass
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return payload


def load_editor(folder: str | Path, device: torch.device | str = "cpu") -> LoadedEditor:
    """Rebuild the hypernetworks of a checkpoint folder (or of its ``editor.safetensors``)."""
    folder = Path(folder)
    if folder.is_file():
        if folder.name != WEIGHTS:
            raise CheckpointError(
                f"{folder}: an EMSEdit checkpoint is a folder with {WEIGHTS} and {META}; "
                "only safetensors are loaded, never pickles"
            )
        folder = folder.parent
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        pickles = [p.name for p in folder.glob("*") if p.suffix in _PICKLE_SUFFIXES]
        hint = f" (found {pickles}: pickled checkpoints are refused)" if pickles else ""
        raise CheckpointError(
            f"{folder} has no {WEIGHTS} + {META}{hint}; create one with "
            "`factkeeper train-editor --model <model> --dataset counterfact --out <folder>`"
        )
    meta = _read_json(folder / META)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META}: format {meta.get('format')!r}, expected {FORMAT}")
    try:
        config = EMSEditConfig.from_dict(meta["config"])
        shapes = {m["name"]: (int(m["d_in"]), int(m["d_out"])) for m in meta["modules"]}
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{folder / META}: bad config or modules: {exc}") from exc
    group = HyperNetGroup(
        shapes,
        [config.net_rank(i) for i in range(config.n_nets)],
        config.n_blocks,
        config.lr_init,
        config.seed,
    )
    tensors = _read_tensors(folder / WEIGHTS)
    try:
        group.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / WEIGHTS} does not match its config: {exc}") from exc
    return LoadedEditor(config, group.to(device), meta)


def check_matches(meta: dict[str, Any], lm: LoadedModel, modules: list[Any]) -> None:
    """Refuse a checkpoint trained for other modules; warn if the base weights differ."""
    saved = [(m["name"], m["d_in"], m["d_out"]) for m in meta.get("modules", [])]
    wanted = [(m.name, m.d_in, m.d_out) for m in modules]
    if saved != wanted:
        raise CheckpointError(
            f"checkpoint was trained for modules {saved}, the model resolves to {wanted}"
        )
    trained_on = meta.get("model", {}).get("base_hash")
    if trained_on and trained_on != lm.base_hash:
        log.warning(
            "EMSEdit checkpoint was trained on other base weights",
            extra={"checkpoint_base": trained_on[:12], "model_base": lm.base_hash[:12]},
        )


def default_checkpoint(model_name: str, paths: Paths | None = None) -> Path:
    """``$FACTKEEPER_HOME/editors/<model>`` if trained there, else the shipped one."""
    paths = paths or Paths.from_env()
    for folder in (paths.editors_dir / model_name, SHIPPED_DIR / model_name):
        if (folder / WEIGHTS).is_file():
            return folder
    raise CheckpointError(
        f"no trained EMSEdit editor for {model_name!r} in {paths.editors_dir} or {SHIPPED_DIR}; "
        f"train one with `factkeeper train-editor --model {model_name} --dataset counterfact`"
    )


def save_train_state(
    folder: str | Path,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    counters: dict[str, Any],
) -> None:
    """Adam moments plus ``tensors`` (drift deltas, pending grads) in safetensors; counters JSON."""
    folder = Path(folder)
    flat: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if key == "step":
                steps[str(index)] = float(value)
            else:
                flat[f"opt.{index}.{key}"] = value
    for name, value in tensors.items():
        if name.startswith("opt."):
            raise CheckpointError(f"train-state tensor name {name!r} clashes with the optimizer's")
        flat[name] = value
    _save_tensors(folder / TRAIN_WEIGHTS, flat)
    _save_json(folder / TRAIN_META, {**counters, "adam_steps": steps})


def load_train_state(
    folder: str | Path, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Restore Adam into ``optimizer``; return (other tensors, counters), or None if absent."""
    folder = Path(folder)
    if not (folder / TRAIN_META).is_file():
        return None
    counters = _read_json(folder / TRAIN_META)
    tensors = _read_tensors(folder / TRAIN_WEIGHTS)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, step in counters.pop("adam_steps", {}).items():
        state[int(index)] = {"step": torch.tensor(step)}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            index, field = key.removeprefix("opt.").split(".", 1)
            state.setdefault(int(index), {})[field] = value
        else:
            others[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    return others, counters

"""The fact-memory editor: EMSEdit's value change, written as one gated row per fact.

Per request it reads the key (the subject's last-token MLP activation at ``key_layer``, averaged
over NSE's prefix templates, as NSE reads its keys) and finds the value change δ at
``value_layer`` that makes the model say the new target, with the trained value network
(EMSEdit's multi-step update, ``editing.nse.value_net``) followed by Adam while the loss is
still high: NSE's value optimisation, so targets of both editors agree. Instead of spreading δ
over weight matrices by a least-squares solve (where every other input whose key overlaps moves
too), it stores (key, δ, threshold) as one row of the model's ``FactMemory``. The row adds δ
only where the model has read that subject, so edits neither disturb other knowledge nor each
other, and removing one is exact.

Targets are computed on the current weights: rows already in the memory fire where they apply,
so a second correction of the same fact is solved on top of the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from editing.adapters import MlpRole
from editing.configfile import ConfigError
from editing.editors.base import EditError, EditMaterial, Editor, EditResult
from editing.hooks import capture_inputs, run_until
from editing.memory.config import MemoryConfig
from editing.memory.module import FactMemory, attach_memory, memory_of, memory_parameter_names
from editing.models import LoadedModel
from editing.nse.config import NSEConfig, preset_for
from editing.nse.keys import compute_targets, keys_and_hidden
from editing.nse.value_net import ValueNet, ValueNetError, load_value_net
from editing.paths import Paths
from editing.requests import EditRequest
from editing.subject import encode_prompt

log = logging.getLogger(__name__)

VALUE_FIELDS = frozenset(
    {
        "v_optimiser",
        "v_num_grad_steps",
        "v_lr",
        "v_weight_decay",
        "v_step",
        "clamp_norm_factor",
        "kl_factor",
        "early_stop_loss",
        "value_net",
        "value_prefixes",
    }
)
"""The NSE settings of the value optimisation that a memory method spec may set."""

DEFAULT_VALUE = {"v_optimiser": "net"}
"""The value network first (EMSEdit's learned update), then NSE's Adam while the loss is high."""


class MemoryEditor(Editor):
    """Fact memory: a value per fact from the value network, stored as a gated row."""

    name = "memory"
    supports_batch = True
    supports_consolidation = True

    def __init__(
        self, config: MemoryConfig | None = None, *, paths: Paths | None = None, **options: Any
    ) -> None:
        memory_options = {
            k: v for k, v in options.items() if k in MemoryConfig.__dataclass_fields__
        }
        value_options = {k: v for k, v in options.items() if k in VALUE_FIELDS}
        unknown = set(options) - set(memory_options) - set(value_options)
        if unknown:
            raise EditError(f"unknown memory option(s): {', '.join(sorted(unknown))}")
        self.config = (config or MemoryConfig()).replace(**memory_options)
        self.value_options = {**DEFAULT_VALUE, **value_options}
        self._paths = paths
        self._value_net: ValueNet | None = None
        self._net_sha256: str | None = None
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # fingerprint -> row

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return frozenset(MemoryConfig.__dataclass_fields__) | VALUE_FIELDS

    def describe(self) -> dict[str, Any]:
        """The settings a result file records (the value settings before the model's preset)."""
        return {**dataclasses.asdict(self.config), "value": dict(self.value_options)}

    def value_config(self, lm: LoadedModel) -> NSEConfig:
        """NSE's settings for the value optimisation: the model's preset (the reference's
        settings for a model without one), z at ``value_layer``."""
        layers = tuple(sorted({self.config.key_layer, self.config.value_layer}))
        try:
            preset = preset_for(lm.name)
        except ConfigError:  # a model of its own: the reference's value settings
            preset = NSEConfig()
        return preset.replace(layers=layers, **self.value_options)

    def prepare_model(self, lm: LoadedModel) -> FactMemory:
        """Attach the (empty) memory this editor writes, if the model has none yet."""
        c = self.config
        return attach_memory(lm, c.key_layer, c.value_layer, c.capacity)

    def _net(self, lm: LoadedModel, config: NSEConfig) -> ValueNet | None:
        if config.v_optimiser != "net":
            return None
        if self._value_net is None:
            try:
                net = load_value_net(lm.name, config.z_layer, config.value_net, self._paths)
            except ValueNetError as exc:
                raise EditError(str(exc)) from exc
            self._value_net = net.to(lm.device)
        return self._value_net

    def rows(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, ...]:
        """(keys (n, d_ff) unit, values (n, d)): each request's row, computed on the current
        weights the first time it is asked for and kept (the material of ``consolidate``)."""
        missing = [r for r in requests if self.fingerprint(lm, r) not in self._rows]
        if missing:
            self._compute_rows(lm, missing)
        rows = [self._rows[self.fingerprint(lm, r)] for r in requests]
        return torch.stack([k for k, _ in rows]), torch.stack([v for _, v in rows])

    def _compute_rows(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        config = self.value_config(lm)
        self.prepare_model(lm)
        started = time.perf_counter()
        keys, _ = keys_and_hidden(lm, requests, [self.config.key_layer], config.z_layer, config)
        key = keys[self.config.key_layer].T  # (n, d_ff)
        unit = key / key.norm(dim=1, keepdim=True).clamp_min(1e-6)
        plain = _plain_keys(lm, requests, self.config.key_layer)
        own = (plain / plain.norm(dim=1, keepdim=True).clamp_min(1e-6) * unit).sum(dim=1)
        below = int((own < self.config.threshold).sum())
        if below:  # the edit prompt itself would not fire the row: the edit will not take there
            log.warning("memory: %d of %d prompts do not reach their own row", below, len(own))
        targets = compute_targets(lm, requests, config.z_layer, config, self._net(lm, config))
        for request, k, target in zip(requests, unit, targets, strict=True):
            value = (target.z - target.h_init).float().cpu()
            self._rows[self.fingerprint(lm, request)] = (k.float().cpu().contiguous(), value)
        log.info(
            "memory rows: %d requests in %.1f s, nll %s",
            len(requests),
            time.perf_counter() - started,
            [round(t.nll, 3) for t in targets],
        )

    def fingerprint(self, lm: LoadedModel, request: EditRequest) -> str:
        """What a row depends on besides the weights: the request, the settings, the network."""
        config = self.value_config(lm)
        net = self._net(lm, config)
        if net is not None and self._net_sha256 is None:
            self._net_sha256 = net.sha256()
        raw = json.dumps(
            [
                [request.request_id, request.prompt, request.subject, request.target_new],
                self.describe(),
                self._net_sha256 if net is not None else None,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def compute_deltas(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, torch.Tensor]:
        keys, values = self.rows(lm, requests)
        return self._write(lm, keys, values)

    def _write(
        self, lm: LoadedModel, keys: torch.Tensor, values: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Deltas that put each (key, value) into a free row with this editor's threshold."""
        memory = self.prepare_model(lm)
        rows = torch.tensor(memory.free_rows(keys.shape[0]))
        names = memory_parameter_names(lm, memory)
        deltas = {
            names["keys"]: torch.zeros_like(memory.keys),
            names["values"]: torch.zeros_like(memory.values),
            names["thresholds"]: torch.zeros_like(memory.thresholds),
        }
        # Free rows are all zero, so each delta is the row's new content.
        deltas[names["keys"]][rows] = keys.to(memory.keys)
        deltas[names["values"]][rows] = values.to(memory.values)
        deltas[names["thresholds"]][rows] = self.config.threshold
        return deltas

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        result = super().apply(lm, requests)
        memory = memory_of(lm)
        assert memory is not None
        result.info["memory_rows_used"] = int(memory.used_rows().numel())
        return result

    # --- consolidation: rows are independent, so the joint solve is writing them all again ----

    def consolidate(self, lm: LoadedModel, held: Sequence[EditRequest]) -> EditResult:
        """Write a row for every request of ``held`` into the (emptied) memory; rows already
        computed (or taken from stored material) are not computed again."""
        return self.apply(lm, held)

    def edit_material(
        self, lm: LoadedModel, requests: Sequence[EditRequest]
    ) -> dict[str, EditMaterial]:
        """Each request's row (key and value), fingerprinted."""
        keys, values = self.rows(lm, requests)
        return {
            r.request_id: EditMaterial(self.fingerprint(lm, r), {"key": k, "value": v})
            for r, k, v in zip(requests, keys, values, strict=True)
        }

    def take_material(self, lm: LoadedModel, request: EditRequest, material: EditMaterial) -> bool:
        """Keep a stored row when it was computed under this editor's settings."""
        fingerprint = self.fingerprint(lm, request)
        if material.fingerprint != fingerprint or set(material.tensors) != {"key", "value"}:
            return False
        self._rows[fingerprint] = (material.tensors["key"], material.tensors["value"])
        return True


@torch.inference_mode()
def _plain_keys(lm: LoadedModel, requests: Sequence[EditRequest], layer: int) -> torch.Tensor:
    """(n, d_ff): each prompt's own key at its subject's last token, without prefixes."""
    down = lm.adapter.module(lm.model, MlpRole.DOWN, layer)
    block = lm.adapter.layers(lm.model)[layer]
    rows = []
    for request in requests:
        encoded = encode_prompt(lm, "{}", request.prompt, request.subject)
        with capture_inputs({"key": down}) as captured:
            run_until(lm.model, block, input_ids=torch.tensor([encoded.ids], device=lm.device))
        rows.append(captured["key"][0, encoded.subject_index].float().cpu())
    return torch.stack(rows)

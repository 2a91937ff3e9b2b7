"""The value network: EMSEdit's multi-step value change, trained to do NSE's optimisation.

NSE finds each fact's value change δ at the z layer with ~20 Adam steps (forward and backward
through every block above it): nearly all of its cost. EMSEdit's idea is to learn the update
instead: at each of a few steps, a small network turns the value gradient g = ∂loss/∂δ into a
value change. Here step k writes

    δ += -s_k·||h||·u/||u||,   u = P_k ĝ,   s_k = cap·sigmoid(a_k + b_k·log(||g||·||h||))

with ĝ = g/||g||, h the z layer's output at the subject (the value it changes), P_k a d×d matrix
(initially the identity) and (a_k, b_k) a step size that depends on how steep the loss is there.
Untrained, it is the normalised step of ``v_optimiser: normalised`` (s = ``first_step``). It is
trained by ``editing.nse.value_training`` on NSE's own value loss, on the original weights,
which is where NSE computes every target: no edit sequence is needed to train it. NSE's writer
(``editing.nse.shift``) then places the result exactly as it places Adam's.

Stored as one safetensors file with its settings and provenance as JSON in the header.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from editing.emsedit.checkpoint import SHIPPED_DIR
from editing.errors import EditError
from editing.files import atomic_write
from editing.paths import Paths

FORMAT = "factkeeper-nse-value-net/1"
FILE_NAME = "nse-value-net.safetensors"
CAP = 1.0
"""Largest step, as a share of ||h|| (the clamp of the whole δ still applies after it)."""


class ValueNetError(EditError):
    """A value-network file that cannot be used (missing, damaged, or for another model): an
    edit that needs it cannot be made."""


class ValueNet(torch.nn.Module):
    """``steps`` learned value updates for residual width ``width``."""

    def __init__(self, width: int, steps: int, first_step: float = 0.25) -> None:
        super().__init__()
        if steps < 1 or not 0 < first_step < CAP:
            raise ValueNetError(f"need steps >= 1 and 0 < first_step < {CAP}")
        self.width, self.steps = width, steps
        self.direction = torch.nn.Parameter(torch.eye(width).repeat(steps, 1, 1))  # (S, d, d)
        a = math.log(first_step / (CAP - first_step))  # sigmoid(a)·CAP = first_step
        self.step_size = torch.nn.Parameter(torch.tensor([[a, 0.0]] * steps))  # (S, 2)
        self.meta: dict[str, Any] = {}

    def step(self, k: int, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The value change of step ``k`` for gradients (n, d) at values h (n, d): (n, d)."""
        g_norm = grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
        h_norm = h.norm(dim=1, keepdim=True)
        u = (grad / g_norm) @ self.direction[k].T
        a, b = self.step_size[k]
        size = CAP * torch.sigmoid(a + b * torch.log(g_norm * h_norm + 1e-12))  # (n, 1)
        return -size * h_norm * u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # --- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """One safetensors file; ``meta`` (settings, provenance, training curve) in its header."""
        self.meta = {**self.meta, **(meta or {})}
        header = {
            "format": FORMAT,
            "width": str(self.width),
            "steps": str(self.steps),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> ValueNet:
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ValueNetError(f"cannot read value network {path}: {exc}") from exc
        if header.get("format") != FORMAT:
            raise ValueNetError(f"{path} is not a value network ({header.get('format')!r})")
        net = cls(int(header["width"]), int(header["steps"]))
        try:
            net.load_state_dict(tensors)
        except RuntimeError as exc:
            raise ValueNetError(f"{path}: {exc}") from exc
        net.meta = json.loads(header.get("meta", "{}"))
        return net

    def sha256(self) -> str:
        """Content hash of the parameters (what an NSE target computed with it depends on)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def default_value_net(model_name: str, paths: Paths) -> Path:
    """``$FACTKEEPER_HOME/editors/<model>/`` if one was trained there, else the shipped one."""
    for folder in (paths.editors_dir / model_name, SHIPPED_DIR / model_name):
        if (folder / FILE_NAME).is_file():
            return folder / FILE_NAME
    raise ValueNetError(
        f"no NSE value network for {model_name!r} in {paths.editors_dir} or {SHIPPED_DIR}; "
        f"train one with `factkeeper train-value-net --model {model_name}`"
    )


def load_value_net(
    model_name: str, z_layer: int, path: str | Path = "", paths: Paths | None = None
) -> ValueNet:
    """The value network at ``path`` (empty: ``default_value_net``), checked to be trained for
    ``z_layer``: a network trained for another layer would write values the model cannot read."""
    path = path or default_value_net(model_name, paths or Paths.from_env())
    net = ValueNet.load(path)
    trained_at = net.meta.get("z_layer")
    if trained_at != z_layer:
        raise ValueNetError(
            f"value network {path} was trained for z layer {trained_at}, the editor's is {z_layer}"
        )
    return net


__all__ = ["CAP", "FILE_NAME", "ValueNet", "ValueNetError", "default_value_net", "load_value_net"]

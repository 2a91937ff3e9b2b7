"""Model snapshots: the edited tensors plus the metadata that says what they contain.

A snapshot stores only the parameters that differ from the base weights, and stores their
*values*, not ``value - base``: in float32, ``base + (value - base)`` does not always round back
to ``value``, and a restore must be bit-exact (``tensors_hash`` proves it). The bytes are the
same as a float32 delta's; ``delta_norms`` in the metadata carries the delta view.

Files: ``tensors.safetensors`` and ``snapshot.json``. Reading refuses anything else that could
hold code (pickles), so a registry entry cannot smuggle one in. A tensor with few nonzero rows
(the fact memory's table) is stored by its rows (``daemon.records.row_sparse``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from daemon.records.row_sparse import ROW_SPARSE_KEY, pack_rows, unpack_rows
from editing.errors import FactkeeperError

TENSORS_FILE = "tensors.safetensors"
META_FILE = "snapshot.json"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class SnapshotError(FactkeeperError):
    """A snapshot is missing, unsafe, or does not match the base model it claims."""


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot holds and where it came from (becomes registry tags)."""

    journal_seq: int  # the last journal sequence number whose edit is in these weights
    event_ids: tuple[str, ...]  # every applied event since the base, in order
    base_hash: str
    editor_config_hash: str
    tensors_hash: str
    delta_norms: dict[str, float]
    kafka_offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next
    parent_version: str | None = None
    audit: dict[str, Any] | None = None
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnapshotMeta:
        raw = json.loads(text)
        raw["event_ids"] = tuple(raw["event_ids"])
        return cls(**raw)


class BaseWeights(Protocol):
    """Read access to the unedited value of any parameter."""

    def get(self, name: str) -> torch.Tensor: ...


class InMemoryBaseWeights:
    """Base values copied from a model before any edit (tiny models, tests)."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str] | None = None) -> None:
        params = dict(model.named_parameters())
        wanted = params.keys() if names is None else names
        self._values = {n: params[n].detach().clone() for n in wanted}

    def get(self, name: str) -> torch.Tensor:
        return self._values[name]


class FolderBaseWeights:
    """Base values read on demand from the model's safetensors folder (no second copy in RAM)."""

    def __init__(self, folder: Path) -> None:
        self._index: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as fh:
                self._index.update(dict.fromkeys(fh.keys(), file))
        if not self._index:
            raise SnapshotError(f"{folder} has no safetensors weights to use as the base")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._index[name], framework="pt") as fh:
            return fh.get_tensor(name)


class ZeroForAdded:
    """Base values of a model that factkeeper gave extra parameters (the fact memory's rows):
    those are zero in the base model, everything else comes from ``inner``."""

    def __init__(self, inner: BaseWeights, zeros: Mapping[str, torch.Tensor]) -> None:
        self._inner, self._zeros = inner, dict(zeros)

    def get(self, name: str) -> torch.Tensor:
        zero = self._zeros.get(name)
        return zero if zero is not None else self._inner.get(name)


def edited_tensors(
    model: torch.nn.Module, base: BaseWeights, candidates: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The current values of the candidate parameters that differ from the base."""
    params = dict(model.named_parameters())
    changed = {}
    for name in candidates:
        value = params[name].detach()
        if not torch.equal(value, base.get(name).to(value.device, value.dtype)):
            changed[name] = value.to("cpu").clone().contiguous()
    return changed


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def delta_norms(tensors: Mapping[str, torch.Tensor], base: BaseWeights) -> dict[str, float]:
    return {
        n: float((t.to(torch.float64) - base.get(n).to(torch.float64)).norm())
        for n, t in sorted(tensors.items())
    }


def write_snapshot(folder: Path, tensors: Mapping[str, torch.Tensor], meta: SnapshotMeta) -> Path:
    """Write both files and fsync them; the folder is complete when ``snapshot.json`` exists."""
    if tensors_hash(tensors) != meta.tensors_hash:
        raise SnapshotError("metadata hash does not match the tensors being written")
    folder.mkdir(parents=True, exist_ok=True)
    stored, shapes = pack_rows(tensors)
    header = {"format": "pt"}
    if shapes:
        header[ROW_SPARSE_KEY] = json.dumps(shapes, sort_keys=True)
    save_file(stored, str(folder / TENSORS_FILE), metadata=header)
    _fsync(folder / TENSORS_FILE)
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(meta.to_json())
    _fsync(tmp)
    os.replace(tmp, folder / META_FILE)
    return folder


def read_snapshot(folder: Path) -> tuple[dict[str, torch.Tensor], SnapshotMeta]:
    """Read a snapshot written by ``write_snapshot``; verify it; never unpickle anything."""
    unsafe = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in _PICKLE_SUFFIXES)
    if unsafe:
        raise SnapshotError(
            f"refusing snapshot {folder}: it contains pickle-format files {unsafe}; "
            f"factkeeper only loads weights from safetensors"
        )
    if not (folder / META_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        raise SnapshotError(f"{folder} is not a complete snapshot ({TENSORS_FILE} + {META_FILE})")
    meta = SnapshotMeta.from_json((folder / META_FILE).read_text())
    try:
        with safe_open(str(folder / TENSORS_FILE), framework="pt") as fh:
            header = fh.metadata() or {}
            stored = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        tensors = unpack_rows(stored, json.loads(header.get(ROW_SPARSE_KEY, "{}")))
    except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as exc:
        raise SnapshotError(f"{folder}: unreadable tensors ({exc})") from exc
    if tensors_hash(tensors) != meta.tensors_hash:
        raise SnapshotError(
            f"{folder}: tensors do not match the recorded hash (corrupt or altered)"
        )
    return tensors, meta


def load_into(
    model: torch.nn.Module,
    base: BaseWeights,
    tensors: Mapping[str, torch.Tensor],
    reset: Iterable[str] = (),
) -> None:
    """Set ``model`` to base + snapshot: ``reset`` parameters go back to base, then ``tensors``."""
    params = dict(model.named_parameters())
    unknown = set(tensors) - params.keys()
    if unknown:
        raise SnapshotError(f"snapshot has tensors the model lacks: {sorted(unknown)[:3]}")
    for name, value in tensors.items():  # check everything before changing anything
        if params[name].shape != value.shape:
            raise SnapshotError(f"{name}: snapshot shape {tuple(value.shape)} != model")
    with torch.no_grad():
        for name in reset:
            params[name].copy_(base.get(name))
        for name, value in tensors.items():
            params[name].copy_(value)


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())

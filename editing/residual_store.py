"""Block inputs of the base model kept on disk, so unedited lower blocks run once per sequence.

The residual stream entering block ``L`` depends only on the tokens and on the weights below
``L``; while those are the base weights (what every resumed pass promises), it is the same in
every process. The scorer keeps these inputs in memory; this store keeps them across processes
too, so an audit after a restart, the next benchmark run or a rebuilt auditor does not run the
lower blocks again for sequences seen before.

Layout: ``<folder>/<base weights sha256>/layer-<L>/<shard>.safetensors``. Each shard holds the
inputs of several sequences, one float tensor (tokens, hidden) per sequence, named by the sha256
of its token ids; a shard is written once, atomically, and never changed. Past ``max_bytes``
the oldest shards are deleted. Deleting any of it is always safe: the lower blocks then run
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from editing.files import atomic_write

log = logging.getLogger(__name__)

FORMAT = "factkeeper-residuals-1"

TokenIds = tuple[int, ...]


def sequence_key(ids: TokenIds) -> str:
    """The tensor name of a token sequence: sha256 of its ids (fixed width, little-endian)."""
    return hashlib.sha256(b"".join(i.to_bytes(4, "little") for i in ids)).hexdigest()


class ResidualStore:
    """Residuals of one base model, per block, on disk.

    Args:
        folder: the root of all stores (one folder per base model inside).
        base_hash: sha256 of the base weights the residuals were computed with.
        max_bytes: disk the shards of all base models under ``folder`` may take.
    """

    def __init__(self, folder: Path, base_hash: str, max_bytes: int = 1 << 30) -> None:
        if not base_hash:
            raise ValueError("a residual store needs the base weights' hash")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.folder = Path(folder)
        self.root = self.folder / base_hash
        self.max_bytes = max_bytes
        self._index: dict[int, dict[str, Path]] = {}

    def _layer_dir(self, layer: int) -> Path:
        return self.root / f"layer-{layer}"

    def _names(self, layer: int) -> dict[str, Path]:
        """Tensor name -> shard, read once per layer from the shards' headers."""
        if layer not in self._index:
            index: dict[str, Path] = {}
            for shard in sorted(self._layer_dir(layer).glob("*.safetensors")):
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        if (f.metadata() or {}).get("format") != FORMAT:
                            continue
                        index.update(dict.fromkeys(f.keys(), shard))
                except (OSError, SafetensorError) as exc:  # a damaged shard costs its entries
                    log.warning(
                        "skipping unreadable residual shard",
                        extra={"shard": str(shard), "error": str(exc)},
                    )
            self._index[layer] = index
        return self._index[layer]

    def load(self, layer: int, sequences: Iterable[TokenIds]) -> dict[TokenIds, torch.Tensor]:
        """The stored inputs of block ``layer`` for those of ``sequences`` that have one."""
        names = self._names(layer)
        wanted: dict[Path, list[tuple[TokenIds, str]]] = {}
        for ids in sequences:
            key = sequence_key(ids)
            if key in names:
                wanted.setdefault(names[key], []).append((ids, key))
        found: dict[TokenIds, torch.Tensor] = {}
        for shard, items in wanted.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for ids, key in items:
                        tensor = f.get_tensor(key)
                        if tensor.shape[0] == len(ids):
                            found[ids] = tensor
            except (OSError, SafetensorError):  # pruned meanwhile, or damaged: compute again
                continue
        return found

    def save(self, layer: int, entries: Mapping[TokenIds, torch.Tensor]) -> None:
        """Add inputs of block ``layer`` for sequences not stored yet (one new shard).

        A failed write (a full disk) is logged, not raised: it only costs running the lower
        blocks again later, which must not fail the audit that computed them.
        """
        names = self._names(layer)
        tensors: dict[str, Any] = {}
        for ids, tensor in entries.items():
            key = sequence_key(ids)
            if key not in names and key not in tensors:
                tensors[key] = tensor.detach().to("cpu", copy=False).contiguous()
        if not tensors:
            return
        shard = self._layer_dir(layer) / f"{uuid.uuid4().hex}.safetensors"
        try:
            atomic_write(
                shard, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT})
            )
            names.update(dict.fromkeys(tensors, shard))
            self._prune()
        except (OSError, SafetensorError) as exc:
            log.warning("residuals not stored", extra={"shard": str(shard), "error": str(exc)})

    def _prune(self) -> None:
        """Delete the oldest shards until all of them fit in ``max_bytes``."""
        shards = []
        for path in self.folder.glob("*/layer-*/*.safetensors"):
            with contextlib.suppress(FileNotFoundError):  # another process pruned it
                stat = path.stat()
                shards.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in shards)
        gone = set()
        for _, size, path in sorted(shards):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            gone.add(path)
            total -= size
        if gone:
            log.info("pruned residual shards", extra={"shards": len(gone), "bytes_left": total})
            for index in self._index.values():
                for name in [n for n, shard in index.items() if shard in gone]:
                    del index[name]

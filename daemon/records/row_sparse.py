"""Tensors whose rows are mostly zero, stored as their nonzero rows and those rows' indices.

A fact-memory edit writes a few rows of a table of thousands (and the base table is all zero),
so its unit deltas and a snapshot's values would otherwise be mostly zero bytes: 60 MB of
SmolLM2's 4,096-row memory for a snapshot holding 20 facts. Both sidecars and snapshots store
such a tensor packed and name it, with its full shape, in the safetensors header under
``ROW_SPARSE_KEY``; unpacking gives back the same bytes, so content hashes are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ROW_SPARSE_KEY = "row_sparse"  # header key: JSON {name: full shape} of the tensors stored by rows
_ROWS, _DATA = "#rows", "#data"


def pack_rows(
    dense: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Store a tensor whose rows are mostly zero (at most a quarter nonzero) as its nonzero
    rows and their indices; the rest as they are.

    Returns the tensors to save and, per packed name, the full shape. A row counts as zero
    only when all its bytes are, so unpacking gives back the same bytes (-0.0 stays).
    """
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in dense.items():
        if tensor.dim() >= 1 and tensor.shape[0] >= 8 and tensor.numel():
            as_bytes = tensor.reshape(tensor.shape[0], -1).view(torch.uint8)
            rows = as_bytes.any(dim=1).nonzero().flatten()
            if 4 * len(rows) <= tensor.shape[0]:
                tensors[name + _ROWS] = rows
                tensors[name + _DATA] = tensor[rows].contiguous()
                shapes[name] = list(tensor.shape)
                continue
        tensors[name] = tensor
    return tensors, shapes


def unpack_rows(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, list[int]]
) -> dict[str, torch.Tensor]:
    """The dense tensors of ``pack_rows``' output."""
    dense = {n: t for n, t in tensors.items() if not n.endswith((_ROWS, _DATA))}
    for name, shape in shapes.items():
        data = tensors[name + _DATA]
        full = torch.zeros(shape, dtype=data.dtype)
        full[tensors[name + _ROWS]] = data
        dense[name] = full
    return dense

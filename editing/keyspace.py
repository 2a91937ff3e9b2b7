"""Linear algebra in an MLP matrix's key space, shared by NSE and the safeguards around editors.

One matrix W (d_out, d_in) maps keys k (d_in) to values. The functions here pick the neurons an
edit may touch (activation mass, NSE), solve for the update that moves the edit keys' outputs
by a residual while leaving generic-text keys (λ·C0) and past edits' keys (M) alone, restricted
to those neurons, and build or apply AlphaEdit's null-space projector of C0. They are pure
functions of tensors: no model, no hooks. Solves run in float64 and return float64; callers cast
once when they add the result to a weight.

Conventions: keys are stored as columns, K (d_in, n); residuals R (d_out, n); second moments
(d_in, d_in). "Neurons" of a W_out-type matrix (down_proj / c_proj) are its input units, i.e.
columns of W; for a W_in-type matrix (up / gate / c_fc) they are its output units (rows), and a
caller masks rows instead (see ``mask_delta``).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from editing.errors import FactkeeperError

log = logging.getLogger(__name__)


class KeySpaceError(FactkeeperError):
    """Inputs to a key-space computation have inconsistent shapes or are not finite."""


def neuron_scores(keys: torch.Tensor) -> torch.Tensor:
    """q_j = Σ_b |K[j, b]|: how strongly the batch's keys use unit j. keys (d_in, n) -> (d_in,)."""
    return keys.abs().sum(dim=1)  # (d_in, n) -> (d_in,)


def select_neurons(keys: torch.Tensor, p: float) -> torch.Tensor:
    """The units that carry the top ``p`` share of the batch's absolute key mass (NSE).

    Sort the scores descending and keep the largest prefix whose cumulative mass is at most
    ``p`` times the total (the reference's rule), but at least one unit. ``p >= 1`` keeps every
    unit (the reference would drop a few to float rounding).

    Args:
        keys: (d_in, n) keys of the edit batch at this layer.
        p: cumulative-mass threshold in (0, 1].

    Returns:
        (|S|,) int64 unit indices, ascending.
    """
    if not 0.0 < p <= 1.0:
        raise KeySpaceError(f"neuron threshold p must be in (0, 1], got {p}")
    d_in = keys.shape[0]
    if p >= 1.0:
        return torch.arange(d_in)
    scores = neuron_scores(keys.double())  # (d_in,)
    ordered, order = torch.sort(scores, descending=True)
    cumulative = torch.cumsum(ordered, dim=0)  # (d_in,)
    count = int((cumulative <= p * cumulative[-1]).sum().item())
    return torch.sort(order[: max(1, count)]).values


def solve_masked_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    *,
    c0: torch.Tensor | None = None,
    lam: float = 0.0,
    memory: torch.Tensor | None = None,
    neurons: torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """The update Δ that moves the edit keys' outputs by ``residual``, touching only ``neurons``.

    Minimises ||Δ K − R||² + λ·tr(Δ C0 Δᵀ) + tr(Δ M Δᵀ) + ridge·||Δ||² subject to Δ[:, j] = 0 for
    j outside S. The λ·C0 term keeps generic-text outputs, M = Σ_past k kᵀ keeps past edits'
    outputs. Closed form on S: Δ[:, S] = R K[S]ᵀ A⁻¹ with
    A = λ·C0[S,S] + M[S,S] + K[S]K[S]ᵀ + ridge·I (NSE spec section 3.3; MEMIT with S = all units).

    Args:
        residual: (d_out, n) desired change of each edit key's output.
        keys: (d_in, n) edit keys.
        c0: (d_in, d_in) second moment of generic keys (per token), or None.
        lam: weight of C0.
        memory: (d_in, d_in) Σ k kᵀ of past edits' keys, or None.
        neurons: (|S|,) indices of the units allowed to change; None = all.
        ridge: extra λ_I·I for conditioning (0 in NSE).

    Returns:
        Δ as float64 (d_out, d_in), exactly zero outside the selected columns.
    """
    d_out, n = residual.shape
    d_in = keys.shape[0]
    if keys.shape[1] != n:
        raise KeySpaceError(
            f"keys {tuple(keys.shape)} and residual {tuple(residual.shape)} differ in n"
        )
    sel = torch.arange(d_in) if neurons is None else neurons.to(torch.long)
    k_s = keys.double()[sel]  # (|S|, n)
    system = k_s @ k_s.T  # (|S|, n) @ (n, |S|) -> (|S|, |S|)
    if c0 is not None and lam:
        _check_square(c0, d_in, "c0")
        system += lam * c0.double()[sel][:, sel]  # (|S|, |S|)
    if memory is not None:
        _check_square(memory, d_in, "memory")
        system += memory.double()[sel][:, sel]  # (|S|, |S|)
    if ridge:
        system += ridge * torch.eye(len(sel), dtype=torch.float64)
    # A is symmetric, so Δ_Sᵀ = A⁻¹ K_S Rᵀ: one solve with d_out right-hand sides.
    rhs = k_s @ residual.double().T  # (|S|, n) @ (n, d_out) -> (|S|, d_out)
    solution = torch.linalg.solve(system, rhs)  # (|S|, d_out)
    if not torch.isfinite(solution).all():
        raise KeySpaceError("the least-squares system is singular: add λ·C0, memory or a ridge")
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    delta[:, sel] = solution.T  # (d_out, |S|)
    return delta


def nullspace_projector(
    c0: torch.Tensor,
    *,
    threshold: float | None = None,
    relative: float | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """P = U₀U₀ᵀ onto the eigenvectors of C0 with small eigenvalues (AlphaEdit).

    Exactly one of the three ways to choose the null space must be given: eigenvalues below an
    absolute ``threshold`` (AlphaEdit: 2e-2 on per-token C0), below ``relative`` times the
    largest eigenvalue, or the ``dim`` smallest eigenvectors.

    Args:
        c0: (d_in, d_in) symmetric positive semi-definite second moment.

    Returns:
        (d_in, d_in) float64 orthogonal projector; ``K0ᵀ P ≈ 0`` for keys in C0's span.
    """
    if sum(x is not None for x in (threshold, relative, dim)) != 1:
        raise KeySpaceError("give exactly one of threshold, relative, dim")
    _check_square(c0, c0.shape[0], "c0")
    sym = c0.double()
    eigvals, eigvecs = torch.linalg.eigh((sym + sym.T) / 2)  # ascending; (d,), (d, d)
    if dim is not None:
        count = dim
    else:
        cut = threshold if threshold is not None else relative * float(eigvals[-1])
        count = int((eigvals < cut).sum().item())
    basis = eigvecs[:, :count]  # (d_in, r)
    log.debug("null space: %d of %d dimensions", count, c0.shape[0])
    return basis @ basis.T  # (d_in, r) @ (r, d_in) -> (d_in, d_in)


def project_delta(delta: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """ΔP: the part of an (out, in) update that acts only on the projector's subspace."""
    return delta.double() @ projector.double()  # (d_out, d_in) @ (d_in, d_in)


def solve_projected_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    *,
    memory: torch.Tensor | None = None,
    ridge: float = 10.0,
) -> torch.Tensor:
    """AlphaEdit's update: Δ = R Kᵀ P (M P + K Kᵀ P + ridge·I)⁻¹ (its code's ``L2`` = ridge).

    Every row of Δ lies in the projector's range, so Δ k = 0 for any key k with P k = 0: the
    preserved keys' outputs do not change at all, whatever the residual.

    Args:
        residual: (d_out, n); keys: (d_in, n); projector: (d_in, d_in); memory: (d_in, d_in).

    Returns:
        float64 (d_out, d_in).
    """
    d_in = keys.shape[0]
    _check_square(projector, d_in, "projector")
    k = keys.double()
    proj = projector.double()
    gram = k @ k.T  # (d_in, n) @ (n, d_in) -> (d_in, d_in)
    if memory is not None:
        _check_square(memory, d_in, "memory")
        gram = gram + memory.double()
    system = proj @ gram + ridge * torch.eye(d_in, dtype=torch.float64)  # (d_in, d_in)
    rhs = proj @ k @ residual.double().T  # (d_in, d_in) @ (d_in, n) @ (n, d_out) -> (d_in, d_out)
    return torch.linalg.solve(system, rhs).T  # (d_out, d_in)


def mask_delta(
    delta: torch.Tensor, neurons: torch.Tensor, axis: Literal["in", "out"] = "in"
) -> torch.Tensor:
    """Zero an (out, in) update outside the given units: columns (``in``) or rows (``out``)."""
    keep = torch.zeros(delta.shape[1 if axis == "in" else 0], dtype=torch.bool)
    keep[neurons] = True
    mask = keep[None, :] if axis == "in" else keep[:, None]  # (1, d_in) or (d_out, 1)
    return torch.where(mask, delta, torch.zeros((), dtype=delta.dtype))  # exact zeros elsewhere


def _check_square(matrix: torch.Tensor, size: int, name: str) -> None:
    if tuple(matrix.shape) != (size, size):
        raise KeySpaceError(f"{name} must be ({size}, {size}), got {tuple(matrix.shape)}")

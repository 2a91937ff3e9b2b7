"""From a module's cached (K, G) rows to one weight shift, and the exact gradient back.

The hypernetwork turns each answer-token row into a value difference ``D``; a ridge
least-squares solve (MALMEN's aggregation, not MEND's sum) turns all rows of a batch of edits into
one shift ``S = argmin ||K S - D||^2 + exp(lamda) ||S||^2`` of shape (d_in, d_out). Training
needs dL/dD and dL/dlamda given Gamma = dL/dS; both come in closed form from the same solve
(the "implicit" backprop), so the solve itself is never differentiated. Solves run in float64;
when there are fewer rows than input features the dual (Woodbury) form is used, which is exact
and costs an (n, n) solve instead of (d_in, d_in).
"""

from __future__ import annotations

import torch

from editing.emsedit.nets import HyperNet


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite float64 matrix."""
    chol = torch.linalg.cholesky(matrix)  # (m, m) lower triangular
    return torch.cholesky_solve(rhs, chol)  # (m, c)


def ridge_shift(keys: torch.Tensor, values: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """S (d_in, d_out) = (K^T K + ridge I)^-1 K^T D, computed in float64, returned in float32.

    Args:
        keys: K, (n, d_in).
        values: D, (n, d_out).
        ridge: scalar ridge strength exp(lamda) > 0.
    """
    k = keys.to(torch.float64)
    d = values.to(torch.float64)
    lam = ridge.to(torch.float64)
    n, d_in = k.shape
    if n <= d_in:
        gram = k @ k.T + lam * torch.eye(n, dtype=k.dtype, device=k.device)  # (n, n)
        shift = k.T @ _spd_solve(gram, d)  # (d_in, n) @ (n, d_out) -> (d_in, d_out)
    else:
        cov = k.T @ k + lam * torch.eye(d_in, dtype=k.dtype, device=k.device)  # (d_in, d_in)
        shift = _spd_solve(cov, k.T @ d)  # (d_in, d_in)^-1 (d_in, d_out) -> (d_in, d_out)
    return shift.to(torch.float32)


@torch.no_grad()
def ridge_backward(
    keys: torch.Tensor, shift: torch.Tensor, grad_shift: torch.Tensor, ridge: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dD (n, d_out) and dL/dlamda (scalar) from Gamma = dL/dS (d_in, d_out).

    With M = K^T K + e^lamda I and Z = M^-1 Gamma: dL/dD = K Z and dL/dlamda = -e^lamda <Z, S>.
    """
    k = keys.to(torch.float64)
    gamma = grad_shift.to(torch.float64)
    lam = ridge.to(torch.float64)
    n, d_in = k.shape
    if n <= d_in:
        # Woodbury: M^-1 = (I - K^T (K K^T + lam I)^-1 K) / lam
        gram = k @ k.T + lam * torch.eye(n, dtype=k.dtype, device=k.device)  # (n, n)
        inner = _spd_solve(gram, k @ gamma)  # (n, n)^-1 (n, d_out) -> (n, d_out)
        z = (gamma - k.T @ inner) / lam  # (d_in, d_out) - (d_in, n) @ (n, d_out)
    else:
        cov = k.T @ k + lam * torch.eye(d_in, dtype=k.dtype, device=k.device)  # (d_in, d_in)
        z = _spd_solve(cov, gamma)  # (d_in, d_out)
    grad_values = k @ z  # (n, d_in) @ (d_in, d_out) -> (n, d_out)
    grad_lamda = -lam * (z * shift.to(torch.float64)).sum()
    return grad_values.to(torch.float32), grad_lamda.to(torch.float32)


def value_diffs(
    net: HyperNet, module: int, keys: torch.Tensor, grads: torch.Tensor, chunk: int
) -> torch.Tensor:
    """The net's value differences D (n, d_out) for all rows, ``chunk`` rows at a time."""
    parts = [
        net.value_diffs(keys[s : s + chunk], grads[s : s + chunk], module)
        for s in range(0, keys.shape[0], chunk)
    ]
    return torch.cat(parts)  # (n, d_out)


@torch.no_grad()
def predict_shift(
    net: HyperNet, module: int, keys: torch.Tensor, grads: torch.Tensor, chunk: int
) -> torch.Tensor:
    """One module's weight shift S (d_in, d_out) for its cached rows (no graph kept)."""
    values = value_diffs(net, module, keys, grads, chunk)  # (n, d_out)
    return ridge_shift(keys, values, net.ridge(module))


def backprop_shift(
    net: HyperNet,
    module: int,
    keys: torch.Tensor,
    grads: torch.Tensor,
    shift: torch.Tensor,
    grad_shift: torch.Tensor,
    chunk: int,
) -> None:
    """Accumulate dL/dtheta into ``net``'s parameters given Gamma = dL/dS (d_in, d_out).

    The rows are recomputed with a graph one chunk at a time, so memory stays at one chunk.
    """
    grad_values, grad_lamda = ridge_backward(keys, shift, grad_shift, net.ridge(module))
    (grad_lamda * net.lamda.weight[module, 0]).backward()
    for s in range(0, keys.shape[0], chunk):
        values = net.value_diffs(keys[s : s + chunk], grads[s : s + chunk], module)  # (c, d_out)
        (grad_values[s : s + chunk] * values).sum().backward()

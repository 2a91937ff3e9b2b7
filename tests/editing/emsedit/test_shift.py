import pytest
import torch

from editing.emsedit.shift import ridge_backward, ridge_shift


@pytest.mark.parametrize("n", [3, 12])  # dual (n <= d_in) and primal (n > d_in) forms
def test_ridge_shift_solves_the_normal_equations(n):
    gen = torch.Generator().manual_seed(n)
    keys = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    ridge = torch.tensor(0.7, dtype=torch.float64)
    shift = ridge_shift(keys, values, ridge).double()  # (6, 4)
    expected = torch.linalg.solve(
        keys.T @ keys + ridge * torch.eye(6, dtype=torch.float64), keys.T @ values
    )
    assert torch.allclose(shift, expected, atol=1e-6)


@pytest.mark.parametrize("n", [3, 12])
def test_ridge_backward_matches_autograd(n):
    gen = torch.Generator().manual_seed(10 + n)
    keys = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    lamda = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    matrix = keys.T @ keys + lamda.exp() * torch.eye(6, dtype=torch.float64)
    shift = torch.linalg.solve(matrix, keys.T @ values)  # (6, 4), differentiable reference
    (weight * shift).sum().backward()
    grad_values, grad_lamda = ridge_backward(keys, shift.detach(), weight, lamda.exp().detach())
    assert torch.allclose(grad_values.double(), values.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_lamda.double(), lamda.grad, rtol=1e-5, atol=1e-6)

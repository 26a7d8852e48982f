"""The two loss terms against their closed forms and their analytic gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mflag.losses import alignment_loss, off_diagonal, orthogonality_loss


def test_alignment_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
    cos = np.array([np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a.numpy(), b.numpy())])
    assert alignment_loss(a, b).item() == pytest.approx(np.mean(4 - 4 * cos), rel=1e-6)
    assert alignment_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(a, -a).item() == pytest.approx(8.0, rel=1e-6)
    assert alignment_loss(a, 3.0 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant


def test_alignment_gradient_matches_the_analytic_one():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    alignment_loss(a, b).backward()
    # d/da of -4 cos(a, b) / B = -4/B * (b_hat - cos * a_hat) / |a|
    an, bn = a.detach().norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    a_hat, b_hat = a.detach() / an, b / bn
    cos = (a_hat * b_hat).sum(1, keepdim=True)
    expected = -4 / a.shape[0] * (b_hat - cos * a_hat) / an
    torch.testing.assert_close(a.grad, expected)


def test_orthogonality_closed_form():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(32, 6, generator=g, dtype=torch.float64)
    c = z.numpy().T @ z.numpy() / 32
    lambd = 0.0051
    expected = (np.sum((np.diag(c) - 1) ** 2) + lambd * (np.sum(c**2) - np.sum(np.diag(c) ** 2))) / 2
    assert orthogonality_loss(z, lambd).item() == pytest.approx(expected, rel=1e-10)


def test_orthonormal_batch_gives_zero():
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    z = q * np.sqrt(64)  # columns orthogonal with squared norm B: z^T z / B = I
    assert orthogonality_loss(z, 0.0051).item() == pytest.approx(0.0, abs=1e-10)
    assert orthogonality_loss(z, 1.0).item() == pytest.approx(0.0, abs=1e-10)


def test_orthogonality_gradient_matches_the_analytic_one():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lambd = 0.3
    orthogonality_loss(z, lambd).backward()
    n = z.shape[0]
    c = z.detach().T @ z.detach() / n
    w = torch.full_like(c, lambd)
    w.fill_diagonal_(1.0)
    target = torch.eye(5, dtype=torch.float64)
    # L = 1/2 sum w_kl (c_kl - t_kl)^2, dc/dz: dL/dz = 2/n * z @ (w * (c - t)) (c symmetric)
    expected = 2 / n * z.detach() @ (w * (c - target))
    torch.testing.assert_close(z.grad, expected)


def test_off_diagonal():
    c = torch.arange(9.0).view(3, 3)
    assert off_diagonal(c).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]

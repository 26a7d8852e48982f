"""The loss terms against their closed forms and their gradients: M-FLAG's two, and ConVIRT's InfoNCE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mflag.losses import alignment_loss, info_nce_loss, off_diagonal, orthogonality_loss


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


def _info_nce_reference(a: np.ndarray, b: np.ndarray, t: float) -> float:
    """Row by row: -log softmax of the matching pair, image->text over a row of cosines / t, text->image over
    a column; the two means averaged."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = a @ b.T / t

    def nll(row: np.ndarray, i: int) -> float:
        m = row.max()
        return m + np.log(np.exp(row - m).sum()) - row[i]

    n = len(a)
    i2t = np.mean([nll(sim[i], i) for i in range(n)])
    t2i = np.mean([nll(sim[:, j], j) for j in range(n)])
    return (i2t + t2i) / 2


@pytest.mark.parametrize("t", [0.1, 1.0])
def test_info_nce_against_the_per_row_softmax(t):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(12, 6, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(12, 6, generator=g, dtype=torch.float64)  # pairs closer than non-pairs
    expected = _info_nce_reference(a.numpy(), b.numpy(), t)
    assert info_nce_loss(a, b, t).item() == pytest.approx(expected, rel=1e-10)
    # not symmetric in its arguments' roles row by row, but the two directions together are
    assert info_nce_loss(b, a, t).item() == pytest.approx(expected, rel=1e-10)
    assert info_nce_loss(3.0 * a, 0.5 * b, t).item() == pytest.approx(expected, rel=1e-10)  # cosines only


def test_info_nce_limits():
    eye = torch.eye(8, dtype=torch.float64)  # orthogonal pairs: cos 1 on the diagonal, 0 elsewhere
    # each row: -log(e^(1/t) / (e^(1/t) + 7)) both ways
    for t in (0.05, 1.0):
        assert info_nce_loss(eye, eye, t).item() == pytest.approx(np.log1p(7 * np.exp(-1 / t)), rel=1e-10)
    same = torch.ones(8, 4, dtype=torch.float64)  # every pair alike: chance, log B
    assert info_nce_loss(same, same, 0.1).item() == pytest.approx(np.log(8), rel=1e-10)


def test_info_nce_gradient():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: info_nce_loss(x, y, 0.1), (a, b))


def test_info_nce_computes_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = info_nce_loss(a.bfloat16(), b.bfloat16(), 0.1)
    assert low.dtype == torch.float32
    # only the inputs' bf16 rounding shows, not a bf16 softmax over logits up to +-10
    assert low.item() == pytest.approx(info_nce_loss(a.bfloat16().float(), b.bfloat16().float(), 0.1).item(), rel=1e-6)

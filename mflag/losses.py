"""The pretraining losses, as functions of features (no model inside): M-FLAG's two terms and the
ConVIRT baseline's symmetric InfoNCE.

alignment_loss: the image and text projections of a pair should point the same way,
    L_align = mean_i [(2 - 2 cos_i) + (2 - 2 cos_i)]  (the image->text and text->image terms of the
    reference code, added; 4 - 4 cos in all).
orthogonality_loss: the latent space should be orthogonal, c = z^T z / B close to the identity,
    L_orth = (sum_k (c_kk - 1)^2 + lambd * sum_{k != l} c_kl^2) / 2   (reference code: lambd = 0.0051).
info_nce_loss: ConVIRT's contrastive objective, the pairs of a batch against each other, both ways,
    logits_ij = cos(z_img_i, z_txt_j) / temperature,
    L = (CE(logits, diag) + CE(logits^T, diag)) / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def alignment_loss(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    z_img = F.normalize(_at_least_fp32(image_emb), dim=1)
    z_txt = F.normalize(_at_least_fp32(text_emb), dim=1)
    cos = (z_img * z_txt).sum(dim=1)  # (B,)
    return ((2 - 2 * cos) + (2 - 2 * cos)).mean()


def orthogonality_loss(features: torch.Tensor, offdiag_weight: float) -> torch.Tensor:
    z = _at_least_fp32(features)  # (B, D)
    with torch.autocast(z.device.type, enabled=False):  # fp32 even under AMP: c sums B products per entry
        c = z.T @ z / z.shape[0]  # (D, D)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return (on_diag + offdiag_weight * off_diag) / 2


def info_nce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    z_img = F.normalize(_at_least_fp32(image_emb), dim=1)
    z_txt = F.normalize(_at_least_fp32(text_emb), dim=1)
    with torch.autocast(z_img.device.type, enabled=False):  # fp32 even under AMP: logits / 0.1 feed a softmax
        logits = z_img @ z_txt.T / temperature  # (B, B): image i against every report of the batch
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

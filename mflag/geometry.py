"""Evaluation of a pretrained embedding: cross-modal retrieval and the geometry of the latent space."""

from __future__ import annotations

import numpy as np


def recall_at_k(sim: np.ndarray, positives: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows of `sim`) whose top-k candidates hold a positive.

    sim: (Q, C) similarities; positives: (Q, C) bool, True where candidate c matches query q (several
    images of one study share one report, so a query may have several correct candidates).
    """
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(positives, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), sim.shape[1])  # rank of the first positive
    return {k: float(np.mean(first < k)) for k in ks}


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def singular_values(features: np.ndarray) -> np.ndarray:
    """Singular values of the centred feature matrix (N, D), descending."""
    x = features.astype(np.float64)
    return np.linalg.svd(x - x.mean(axis=0), compute_uv=False)


def effective_rank(features: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli, 2007); NaN for features that are
    all equal, every dimension's SD within 1e-12 as in :func:`mean_abs_offdiag_correlation` (a zero
    spectrum has no distribution to take the entropy of)."""
    s = singular_values(features)
    if not s.size or not s[0] > 1e-12 * np.sqrt(len(features)):
        return float("nan")
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def mean_abs_offdiag_correlation(features: np.ndarray) -> float:
    """Mean |Pearson correlation| between distinct feature dimensions (constant dimensions left out)."""
    x = features.astype(np.float64)
    x = x[:, x.std(axis=0) > 1e-12]
    if x.shape[1] < 2:
        return float("nan")
    c = np.corrcoef(x, rowvar=False)
    d = c.shape[0]
    return float((np.abs(c).sum() - np.trace(np.abs(c))) / (d * (d - 1)))

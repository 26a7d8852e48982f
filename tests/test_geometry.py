"""Retrieval recall and latent-geometry figures against hand computations and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import top_k_accuracy_score

from mflag.geometry import cosine_similarity, effective_rank, mean_abs_offdiag_correlation, recall_at_k


def test_recall_matches_sklearn_top_k_with_one_positive_per_query():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(40, 40))
    pos = np.eye(40, dtype=bool)
    r = recall_at_k(sim, pos)
    for k in (1, 5, 10):
        assert r[k] == pytest.approx(top_k_accuracy_score(np.arange(40), sim, k=k, labels=np.arange(40)))


def test_recall_counts_any_of_several_positives():
    sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1], [0.5, 0.4, 0.6]])
    pos = np.array([[False, True, False], [True, True, False], [True, False, False]])
    assert recall_at_k(sim, pos, ks=(1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarity(a, a), [[1, 2**-0.5], [2**-0.5, 1]])


def test_effective_rank_of_known_spectra():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(200, 8)))
    iso = q * 10.0  # 8 equal singular values after centring (approximately)
    assert effective_rank(iso - iso.mean(0)) == pytest.approx(8.0, rel=0.05)
    line = np.outer(rng.normal(size=200), rng.normal(size=8))  # rank one
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)


def test_mean_abs_offdiag_correlation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 3))
    assert mean_abs_offdiag_correlation(x) < 0.05
    y = np.stack([x[:, 0], -x[:, 0], x[:, 0], np.ones(5000)], axis=1)  # constant column left out
    assert mean_abs_offdiag_correlation(y) == pytest.approx(1.0)


def test_geometry_of_collapsed_features_is_undefined():
    """All-equal features have no spectrum to take the entropy of: NaN (not 1.0 from 0/0 noise), and the
    pretraining report writes such a value as null with its reason (JSON has no NaN)."""
    same = np.tile(np.array([[0.1, 0.2, 0.3]]), (50, 1))
    assert np.isnan(effective_rank(same)) and np.isnan(mean_abs_offdiag_correlation(same))
    assert effective_rank(same + np.eye(50, 3)) > 1


def test_the_pretraining_report_writes_undefined_geometry_as_null(monkeypatch):
    import torch

    import mflag.pretrain
    from tests.test_pretrain import tiny_data, tiny_model

    model = tiny_model()
    monkeypatch.setattr(model, "encode_image", lambda x: (torch.ones(len(x), 32), torch.randn(len(x), 12)))
    metrics, spectrum = mflag.pretrain.evaluate(model, tiny_data(), 20, 8, torch.device("cpu"))
    assert metrics["effective_rank"] is None and metrics["mean_abs_offdiag_corr"] is None
    assert set(metrics["not_evaluable"]) == {"effective_rank", "mean_abs_offdiag_corr"}
    assert metrics["valid_images"] == 4 and np.allclose(spectrum, 0)

"""Bootstrap over the test cases (mflag/stats.py): the resamples are deterministic in any process and the same
for every encoder, replicates of a mean are hand-computed means, and the intervals are the percentiles of the
defined replicates (None, never NaN, when too few are defined). The evaluators' own evidence is tested against
sklearn and a fresh COCOeval in tests/test_classify.py, test_segment.py and test_detect.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mflag.stats import interval, min_defined, paired_difference, replicates, resample_indices
from tests.conftest import REPO


# ------------------------------------------------------------------------------------------ resamples
def test_resample_indices_shape_range_and_determinism():
    state = np.random.get_state()
    idx = resample_indices(37, 200, 42, "cls_rsna")
    assert idx.shape == (200, 37) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < 37
    assert np.array_equal(idx, resample_indices(37, 200, 42, "cls_rsna"))
    assert not np.array_equal(idx, resample_indices(37, 200, 43, "cls_rsna"))  # the seed counts
    assert not np.array_equal(idx, resample_indices(37, 200, 42, "seg_rsna"))  # and the key
    assert np.array_equal(idx[:50], resample_indices(37, 50, 42, "cls_rsna"))  # more resamples extend the same draw
    # drawn with replacement: rows repeat cases (P(no repeat in 37 draws) ~ 1e-15)
    assert all(len(np.unique(row)) < 37 for row in idx)
    # every case about equally often: 200 x 37 draws, each case expected 200 times
    counts = np.bincount(idx.ravel(), minlength=37)
    assert counts.min() > 140 and counts.max() < 260
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the global RNG is left alone
    assert resample_indices(0, 5, 42, "x").shape == (5, 0)
    with pytest.raises(ValueError):
        resample_indices(10, 0, 42, "x")
    with pytest.raises(ValueError):
        resample_indices(10, 5, -1, "x")


def test_resample_indices_are_the_same_in_another_process():
    """Not Python's hash() (salted per process): the same draw under any PYTHONHASHSEED."""
    code = ("import json; from mflag.stats import resample_indices; "
            "print(json.dumps(resample_indices(23, 7, 5, 'det_objcxr').tolist()))")
    here = resample_indices(23, 7, 5, "det_objcxr").tolist()
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True)  # fmt: skip
        assert json.loads(out.stdout) == here


# --------------------------------------------------------------------------------------- replicates
def test_replicates_of_per_case_values_are_the_means_of_the_drawn_cases():
    values = np.array([0.0, 1.0, 0.5, 0.25])
    idx = np.array([[0, 1, 2, 3], [1, 1, 1, 1], [3, 0, 3, 2], [2, 2, 0, 1]])
    # by hand: a drawn case counts as many times as drawn
    np.testing.assert_allclose(replicates(values, idx), [1.75 / 4, 1.0, 1.0 / 4, 2.0 / 4], rtol=0, atol=1e-15)
    big = np.random.default_rng(0).uniform(size=300)
    assert replicates(big, np.arange(300)[None])[0] == pytest.approx(big.mean(), abs=1e-15)
    with pytest.raises(ValueError, match="indices must lie"):
        replicates(values, np.array([[0, 4, 1, 2]]))
    with pytest.raises(ValueError, match=r"\(B, m\) integer"):
        replicates(values, np.array([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="no replicates for evidence of type list"):
        replicates([0.0, 1.0], np.array([[0, 1]]))


def test_same_resamples_pair_the_encoders():
    """Two encoders whose per-case values differ by a constant: on the same resamples every replicate differs by
    that constant, so the paired interval is the point; unpaired resamples would spread it."""
    rng = np.random.default_rng(1)
    a = rng.uniform(size=150)
    b = a - 0.1
    idx = resample_indices(150, 500, 42, "seg_siim")
    reps_a, reps_b = replicates(a, idx), replicates(b, idx)
    np.testing.assert_allclose(reps_a - reps_b, 0.1, atol=1e-12)
    lo, hi = paired_difference(reps_a, reps_b, 0.95)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.1, abs=1e-12)
    unpaired = replicates(b, resample_indices(150, 500, 42, "another key"))
    lo, hi = paired_difference(reps_a, unpaired, 0.95)
    assert hi - lo > 0.05


# ---------------------------------------------------------------------------------------- intervals
def test_interval_is_the_percentiles_of_the_defined_replicates():
    reps = np.arange(101, dtype=float)  # quantile q of 0..100 is 100 q exactly
    assert interval(reps, 0.9) == pytest.approx((5.0, 95.0))
    assert interval(reps, 0.5) == pytest.approx((25.0, 75.0))
    shuffled = np.random.default_rng(0).permutation(np.concatenate([reps, np.full(30, np.nan)]))
    assert interval(shuffled, 0.9) == pytest.approx((5.0, 95.0))  # NaN replicates are left out
    lo, hi = interval(np.arange(1001, dtype=float) / 1000, 0.95)
    assert (lo, hi) == pytest.approx((0.025, 0.975))


def test_interval_is_none_when_too_few_replicates_are_defined():
    assert min_defined(0.95) == 40 and min_defined(0.9) == 20 and min_defined(0.5) == 4
    reps = np.full(1000, np.nan)
    assert interval(reps, 0.95) == (None, None)  # a metric not evaluable: all NaN
    reps[:39] = np.linspace(0.6, 0.8, 39)
    assert interval(reps, 0.95) == (None, None)
    reps[39] = 0.7
    lo, hi = interval(reps, 0.95)
    assert isinstance(lo, float) and isinstance(hi, float) and 0.6 <= lo < hi <= 0.8
    assert paired_difference(np.full(100, np.nan), np.zeros(100), 0.95) == (None, None)
    with pytest.raises(ValueError):
        interval(np.zeros(100), 1.0)


def test_paired_difference_by_hand():
    a = np.arange(101, dtype=float)
    b = np.zeros(101)
    assert paired_difference(a, b, 0.9) == pytest.approx((5.0, 95.0))
    assert paired_difference(b, a, 0.9) == pytest.approx((-95.0, -5.0))
    a_nan, b_nan = np.append(a, [np.nan, 3.0]), np.append(b, [0.0, np.nan])  # undefined in either: left out
    assert paired_difference(a_nan, b_nan, 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError, match="not paired"):
        paired_difference(a, b[:50], 0.9)


def test_interval_of_a_mean_has_the_normal_width():
    """The percentile interval of a mean over n cases is close to +-1.96 sd / sqrt(n) (seeded: no flakiness)."""
    values = np.random.default_rng(3).normal(size=400)
    lo, hi = interval(replicates(values, resample_indices(400, 2000, 42, "width")), 0.95)
    se = values.std() / np.sqrt(400)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert lo < values.mean() < hi

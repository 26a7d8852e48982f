"""Bootstrap intervals over the test cases, paired across encoders.

The study scores several encoders on the same test cases of a job. Every cell gets a percentile interval of
its test metric, and every pair of encoders a percentile interval of the difference of their metrics; the
difference is paired because both metrics are computed on the SAME resamples of the test cases:

    idx = resample_indices(n_test, resamples, seed, key=job_name)   # (B, n_test), the same for every encoder
    reps = replicates(result.pop("cases"), idx)                     # (B,) the cell's metric on each resample
    interval(reps, level)                                           # the cell's interval
    paired_difference(reps_a, reps_b, level)                        # encoder a minus encoder b

The evidence (``cases``) is what an evaluator returns about each test case, in ``data.test_rows`` order: a
plain (n,) array of per-case values whose mean is the metric (segmentation's Dice), or an object with ``n``
and ``replicates(idx)`` (:class:`mflag.finetune.classify.ProbeCases`,
:class:`mflag.finetune.detect.DetectionCases`). A metric that is undefined on a resample (an AUC on one class,
an mAP without a truth box) is NaN there; the intervals ignore such replicates.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Cases", "resample_indices", "replicates", "interval", "paired_difference", "min_defined"]


@runtime_checkable
class Cases(Protocol):
    """Per-test-case evidence of a cell whose metric is not a plain mean over the cases."""

    n: int  # the number of test cases

    def replicates(self, idx: np.ndarray) -> np.ndarray:
        """(B,) the cell's metric on each row of case indices ``idx`` (B, m), duplicates counting as drawn."""


def resample_indices(n: int, resamples: int, seed: int, key: str) -> np.ndarray:
    """(resamples, n) int64 indices into the n test cases, drawn uniformly with replacement.

    The generator is numpy's default (PCG64) seeded by ``seed`` and the SHA-256 of ``key`` (a job's name), not
    by Python's ``hash()``, which changes between processes: the same arguments give the same array in any
    process, and different keys give independent draws.
    """
    if n < 0 or resamples < 1:
        raise ValueError(f"resample_indices needs n >= 0 and resamples >= 1, got n={n}, resamples={resamples}")
    if int(seed) < 0:
        raise ValueError(f"resample_indices: seed must be >= 0, got {seed}")
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, len(digest), 4)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *words])))
    if n == 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    return rng.integers(0, n, size=(resamples, n), dtype=np.int64)


def replicates(cases: np.ndarray | Cases, idx: np.ndarray) -> np.ndarray:
    """(B,) float64: the cell's metric computed on the test cases ``idx[b]`` for each row b of ``idx`` (B, m).

    ``cases``: an (n,) array of per-case values (the metric is their mean), or :class:`Cases` evidence, which
    computes its own metric. A case drawn twice counts twice; ``idx = arange(n)[None]`` gives the metric the
    cell reports (to float rounding). NaN where the metric is undefined on a resample.
    """
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"replicates: idx must be a (B, m) integer array, got {idx.dtype} {idx.shape}")
    if isinstance(cases, np.ndarray):
        values = np.asarray(cases, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"replicates: per-case values must be (n,), got {values.shape}")
        n = len(values)
    elif isinstance(cases, Cases):
        n = int(cases.n)
    else:
        raise TypeError(f"replicates: no replicates for evidence of type {type(cases).__name__}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"replicates: indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    if isinstance(cases, np.ndarray):
        if idx.shape[1] == 0:
            return np.full(len(idx), np.nan)
        return values[idx].mean(axis=1)
    return np.asarray(cases.replicates(idx), dtype=np.float64).reshape(len(idx))


def min_defined(level: float) -> int:
    """The fewest defined replicates an interval at ``level`` is given from: 2 / (1 - level) (40 at 0.95), so that
    each tail beyond a bound holds at least one replicate; with fewer, the bounds would be the extreme replicates
    whatever the level."""
    _check_level(level)
    return math.ceil(2.0 / (1.0 - level) - 1e-9)


def interval(reps: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """The percentile bootstrap interval ``(lo, hi)`` of replicates ``reps`` (B,) at coverage ``level``.

    The (1 - level) / 2 and (1 + level) / 2 quantiles (numpy's linear interpolation) of the defined (not NaN)
    replicates: a replicate undefined on its resample (an AUC where the resample holds one class) is left out,
    which conditions the interval on the metric being defined. Returns ``(None, None)`` when fewer than
    :func:`min_defined` replicates are defined (a metric not evaluable gives all-NaN replicates): never NaN.
    """
    _check_level(level)
    values = np.asarray(reps, dtype=np.float64).reshape(-1)
    values = values[~np.isnan(values)]
    if len(values) < min_defined(level):
        return None, None
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def paired_difference(reps_a: np.ndarray, reps_b: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """The percentile interval of ``reps_a - reps_b``: two encoders' replicates on the same resamples (row b of
    both from the same ``idx[b]``). A resample where either is NaN is left out; ``(None, None)`` when fewer than
    :func:`min_defined` differences are defined, as :func:`interval`."""
    a = np.asarray(reps_a, dtype=np.float64).reshape(-1)
    b = np.asarray(reps_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: replicates of different lengths {len(a)} and {len(b)} are not paired")
    return interval(a - b, level)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"the interval's level must lie in (0, 1), got {level}")

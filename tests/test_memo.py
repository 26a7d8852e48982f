"""Features shared between a job's fractions in one process: MemoryMemo computes each split once, and the
segmenter and the detector give the same results from the shared valid/test features as from computing them."""

from __future__ import annotations

import numpy as np
import pytest

from mflag.finetune.detect import train_detector
from mflag.finetune.memo import MemoryMemo, no_memo
from mflag.finetune.segment import train_segmenter
from test_detect import cfg_with, task_data, tiny_task  # noqa: F401  (fixture)
from test_segment import _cfg, _squares, _task, _without_timing, trunk_state  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Counting:
    """A memo that records which splits were asked for and passes them on."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def __call__(self, split, compute):
        self.asked.append(split)
        return self.inner(split, compute)


def test_memory_memo_computes_each_split_once():
    calls = []

    def compute():
        calls.append(1)
        return [len(calls)]

    memo = MemoryMemo()
    first = memo("valid", compute)
    assert memo("valid", compute) is first and calls == [1]
    assert memo("test", compute) == [2] and len(calls) == 2  # another split is computed
    assert no_memo("test", lambda: 7) == 7


def _with_replicates(res: dict) -> dict:
    """The result with its per-case evidence replaced by the metric on a few fixed resamples (comparable)."""
    from mflag.stats import replicates, resample_indices

    cases = res.pop("cases")
    n = len(cases) if isinstance(cases, np.ndarray) else cases.n
    return res | {"replicates": replicates(cases, resample_indices(n, 5, 0, "memo")).tolist()}


def test_segmenter_same_result_from_shared_features(trunk_state):  # noqa: F811
    images, masks = _squares(14, 32, seed=3, p_empty=0.3)
    task = _task(images, masks, np.arange(8), np.arange(8, 11), np.arange(11, 14))
    cfg = _cfg(max_epochs=2, augment=False, precision="bf16")
    shared = MemoryMemo()
    runs = []
    for memo in (None, Counting(shared), Counting(shared)):  # the second and third reuse the first's features
        logs = []
        res = train_segmenter(trunk_state, task, cfg, "cpu", seed=0, log=logs.append, memo=memo)
        runs.append((_with_replicates(res), _without_timing(logs)))
        if memo is not None:
            assert memo.asked == ["valid", "test"]  # the train rows depend on the fraction: never shared
    assert sorted(shared.store) == ["test", "valid"]
    assert runs[0] == runs[1] == runs[2]


def test_detector_same_result_from_shared_features(tiny_task):  # noqa: F811
    state, images, boxes = tiny_task
    task = task_data(images, boxes, (np.arange(8), np.arange(8, 12), np.arange(12, 16)))
    cfg = cfg_with(precision="bf16", max_epochs=2)
    shared = MemoryMemo()
    runs = []
    for memo in (None, Counting(shared), Counting(shared)):
        res = _with_replicates(train_detector(state, task, cfg, "cpu", seed=3, memo=memo))
        runs.append({k: v for k, v in res.items() if k not in ("feature_seconds", "train_images_per_second")})
        if memo is not None:
            assert memo.asked == ["valid", "test"]
    assert sorted(shared.store) == ["test", "valid"]
    assert runs[0] == runs[1] == runs[2]

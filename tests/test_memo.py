"""Features shared between a job's cells: FileMemo stores and reloads exactly, and the segmenter and the
detector give the same results from stored valid/test features as from computing them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mflag.finetune.detect import train_detector
from mflag.finetune.memo import FileMemo, no_memo
from mflag.finetune.segment import train_segmenter
from test_detect import SMALL, cfg_with, tiny_task  # noqa: F401  (fixture)
from test_segment import _cfg, _squares, _without_timing, trunk_state  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Counting:
    """A memo that records which splits were asked for and passes them on."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def __call__(self, split, compute):
        self.asked.append(split)
        return self.inner(split, compute)


def test_file_memo_computes_once_and_reloads_bit_identical(tmp_path):
    value = ([torch.randn(3, 4).bfloat16(), torch.zeros(3, 0, 2, 2)], torch.arange(6).reshape(2, 3))
    calls = []

    def compute():
        calls.append(1)
        return value

    memo = FileMemo(tmp_path / "features", "job-init-abc")
    first = memo("valid", compute)
    again = FileMemo(tmp_path / "features", "job-init-abc")("valid", compute)
    assert len(calls) == 1 and first is value
    assert again[0][0].dtype == torch.bfloat16 and torch.equal(again[0][0], value[0][0])
    assert again[0][1].shape == (3, 0, 2, 2) and torch.equal(again[1], value[1])
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["job-init-abc-valid.pt"]  # no temporary
    FileMemo(tmp_path / "features", "job-init-other")("valid", compute)  # another key is another file
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["job-init-abc-valid.pt", "job-init-other-valid.pt"]
    # a newer key of the same job and init replaces the older ones, and leaves other jobs' files alone
    FileMemo(tmp_path / "features", "job-init-new", replaces="job-init-*")("test", compute)
    FileMemo(tmp_path / "features", "job-init-new", replaces="job-init-*")("valid", compute)
    (tmp_path / "features" / "job2-init-abc-valid.pt").write_bytes(b"")
    FileMemo(tmp_path / "features", "job-init-new", replaces="job-init-*")("valid", compute)  # loaded: no write
    assert len(calls) == 4
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [
        "job-init-new-test.pt", "job-init-new-valid.pt", "job2-init-abc-valid.pt"]
    assert no_memo("test", lambda: 7) == 7


def test_segmenter_same_result_from_stored_features(trunk_state, tmp_path):  # noqa: F811
    images, masks = _squares(14, 32, seed=3, p_empty=0.3)
    rows = (np.arange(8), np.arange(8, 11), np.arange(11, 14))
    cfg = _cfg(max_epochs=2, augment=False, precision="bf16")
    runs = []
    for memo in (None, Counting(FileMemo(tmp_path, "seg")), Counting(FileMemo(tmp_path, "seg"))):
        logs = []
        runs.append((train_segmenter(trunk_state, images, masks, *rows, cfg, "cpu", seed=0, log=logs.append, memo=memo),
                     _without_timing(logs)))  # fmt: skip
        if memo is not None:
            assert memo.asked == ["valid", "test"]  # the train rows depend on the fraction: never stored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg-test.pt", "seg-valid.pt"]
    assert runs[0] == runs[1] == runs[2]


def test_detector_same_result_from_stored_features(tiny_task, tmp_path):  # noqa: F811
    state, images, boxes = tiny_task
    rows = (np.arange(8), np.arange(8, 12), np.arange(12, 16))
    cfg = cfg_with(precision="bf16", max_epochs=2)
    runs = []
    for memo in (None, Counting(FileMemo(tmp_path, "det")), Counting(FileMemo(tmp_path, "det"))):
        res = train_detector(state, images, boxes, *rows, cfg, "cpu", seed=3, widths=SMALL, memo=memo)
        runs.append({k: v for k, v in res.items() if k not in ("feature_seconds", "train_images_per_second")})
        if memo is not None:
            assert memo.asked == ["valid", "test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det-test.pt", "det-valid.pt"]
    assert runs[0] == runs[1] == runs[2]

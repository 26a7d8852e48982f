"""The constant predictor's score each cell records (mflag.finetune.checks.trivial_score), against the metrics'
own implementations run on an explicit constant prediction: scikit-learn's roc_auc_score and accuracy_score,
the per-image Dice of mflag.finetune.segment on empty masks, and pycocotools' mAP with no detection."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from mflag.finetune.checks import trivial_score
from mflag.finetune.data import TaskData, passes_per_epoch, fingerprint_test_set
from mflag.finetune.detect import coco_map
from mflag.finetune.segment import dice_per_image

TRAIN, VALID, TEST = np.arange(0, 30), np.arange(30, 40), np.arange(40, 60)


def _data(**kw) -> TaskData:
    return TaskData(dataset="x", images=np.zeros((60, 8, 8), np.uint8), index=pd.DataFrame(index=range(60)),
                    train_rows=TRAIN, valid_rows=VALID, test_rows=TEST, **kw)  # fmt: skip


def test_multiclass_accuracy_is_the_training_majority_class_on_test():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    y[TRAIN[:20]] = 2  # class 2 is the training subset's majority; test has its own mix
    majority = np.bincount(y[TRAIN]).argmax()
    assert majority == 2
    want = accuracy_score(y[TEST], np.full(len(TEST), majority))
    assert trivial_score(_data(labels=y, kind="multiclass"), "cls") == pytest.approx(want)


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_auc_of_a_constant_score_is_one_half(kind):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (60, 3) if kind == "multilabel" else 60).astype(np.float32)
    y_test = y[TEST].reshape(len(TEST), -1)
    want = np.mean([roc_auc_score(y_test[:, k], np.zeros(len(TEST))) for k in range(y_test.shape[1])])
    assert trivial_score(_data(labels=y, kind=kind), "cls") == pytest.approx(want) == 0.5


def test_segmentation_floor_is_the_dice_of_empty_masks():
    rng = np.random.default_rng(2)
    masks = np.zeros((60, 8, 8), np.uint8)
    for r in rng.choice(60, 25, replace=False):
        masks[r, 2:5, 3:6] = 1
    want = dice_per_image(np.zeros_like(masks[TEST]), masks[TEST]).mean()
    assert 0 < want < 1
    assert trivial_score(_data(masks=masks), "seg") == pytest.approx(want)


def test_detection_floor_is_the_map_of_no_detection():
    truths = [np.array([[1.0, 1.0, 5.0, 5.0]]) if r % 3 == 0 else np.zeros((0, 4)) for r in TEST]
    want = coco_map([np.zeros((0, 5))] * len(TEST), truths, (0.5, 0.75))
    assert trivial_score(_data(boxes={int(r): t for r, t in zip(TEST, truths)}), "det") == want == 0.0


@pytest.mark.parametrize("n, floor, passes", [(100, 0, 1), (100, 100, 1), (100, 101, 2), (16, 512, 32), (15, 512, 35)])
def test_passes_per_epoch(n, floor, passes):
    assert passes_per_epoch(n, floor) == passes


def test_passes_per_epoch_refuses_an_empty_subset():
    with pytest.raises(ValueError, match="no training images"):
        passes_per_epoch(0, 10)


def test_the_test_set_fingerprint_is_the_hash_of_the_test_ids_in_order():
    """What every cell writes as `test_set` and the signal script checks cells by: sha256 of the test image ids,
    newline-joined in test-row order, first 16 hex digits."""
    data = TaskData(dataset="x", images=np.zeros((4, 8, 8), np.uint8),
                    index=pd.DataFrame({"image_id": ["a", "b", "c", "d"]}), train_rows=np.array([0]),
                    valid_rows=np.array([2]), test_rows=np.array([3, 1]))  # fmt: skip
    assert fingerprint_test_set(data) == hashlib.sha256(b"d\nb").hexdigest()[:16]

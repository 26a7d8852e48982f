"""Detection (mflag/finetune/detect.py): the metric on hand-worked cases, anchors and target assignment by
hand, decoding + NMS, the loss's ignore rule, the config from params, a frozen encoder and determinism of a
tiny training run, and learnability: from a random trunk the detector finds bright squares (AP@0.5 >= 0.8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mflag.finetune.checks import SubsetCheck, SubsetError, cell_record, check_subsets
from mflag.finetune.data import TaskData
from mflag.finetune.detect import (
    YOLO_WIDTHS,
    DetectConfig,
    DetectionCases,
    YoloDetector,
    assign_targets,
    build_detector,
    coco_average_precisions,
    coco_map,
    decode_and_nms,
    encode_features,
    train_detector,
    yolo_anchors,
    yolo_loss,
)
from mflag.models import resnet50_trunk
from mflag.params import DetectParams
from mflag.stats import interval, replicates, resample_indices

THRESHOLDS = tuple(np.round(np.arange(0.40, 0.7501, 0.05), 2))
SMALL = (16, 32, 64)  # narrow neck widths for the training tests (YOLOv3's 128/256/512 are tested for shape)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_with(**kw) -> DetectConfig:
    base = dict(lr=1e-3, weight_decay=1e-6, batch_size=4, max_epochs=2, patience=10, input_size=64,
                conf_threshold=0.5, nms_iou=0.5, iou_thresholds=THRESHOLDS, drop_empty_test=False,
                eval_batch_size=8, precision="fp32", widths=SMALL)  # fmt: skip
    base.update(kw)
    return DetectConfig(**base)


def task_data(images, boxes, rows) -> TaskData:
    """The TaskData of a detection test: images, boxes and (train, valid, test) rows."""
    train, valid, test = (np.asarray(r, np.int64) for r in rows)
    return TaskData(dataset="test", images=images, index=None, train_rows=train, valid_rows=valid, test_rows=test,
                    boxes=boxes)  # fmt: skip


def test_config_from_params():
    c = DetectParams(lr={"rsna": {"pct1": 2e-4, "pct10": 5e-4, "pct100": 6e-4}},
                     batch_size={"rsna": {"pct1": 8, "pct10": 16, "pct100": 32}}, weight_decay=1e-6, max_epochs=50,
                     patience=10, input_size=224, conf_threshold=0.5, nms_iou=0.45, iou_thresholds=list(THRESHOLDS),
                     drop_empty_test=True, neck_widths=[32, 64, 128], min_epoch_images=300,
                     eval_batch_size=64)  # fmt: skip
    cfg = DetectConfig.from_params(c, "rsna", 10, "bf16")
    assert cfg == DetectConfig(lr=5e-4, weight_decay=1e-6, batch_size=16, max_epochs=50, patience=10, input_size=224,
                               conf_threshold=0.5, nms_iou=0.45, iou_thresholds=THRESHOLDS, drop_empty_test=True,
                               eval_batch_size=64, precision="bf16", widths=(32, 64, 128),
                               min_epoch_images=300)  # fmt: skip
    assert isinstance(cfg.iou_thresholds, tuple) and isinstance(cfg.widths, tuple)
    cfg100 = DetectConfig.from_params(c, "rsna", 100, "fp32")
    assert (cfg100.lr, cfg100.batch_size, cfg100.precision) == (6e-4, 32, "fp32")
    assert cfg_with(widths=YOLO_WIDTHS).widths == (128, 256, 512)


# ------------------------------------------------------------------------------------------- metric
# Hand-worked COCO AP: detections of all images ranked by score, each matched greedily to the unmatched truth
# of its image with the highest IoU >= the threshold; precision made non-increasing from the right; the mean
# over the 101 recall points 0, 0.01, ..., 1 of the precision at the first rank reaching that recall (0 when
# none does).
G = np.array([[10, 10, 50, 50]], np.float64)
HIT = np.array([[10, 10, 50, 50, 0.9]])
NO_TRUTH = np.zeros((0, 4))
NONE = np.zeros((0, 5))


def test_map_perfect_box():
    assert coco_map([HIT], [G], THRESHOLDS) == pytest.approx(1.0)
    np.testing.assert_allclose(coco_average_precisions([HIT], [G], THRESHOLDS), np.ones(len(THRESHOLDS)))
    # an image with neither truth nor prediction changes nothing
    assert coco_map([HIT, NONE], [G, NO_TRUTH], THRESHOLDS) == pytest.approx(1.0)


def test_map_missed_box():
    # one of two truths found (the other image has no prediction): precision 1 up to recall 0.5 -> 51 points
    assert coco_map([HIT, NONE], [G, G], THRESHOLDS) == pytest.approx(51 / 101)
    # the same with both truths on one image
    two = np.concatenate([G, G + 100])
    assert coco_map([HIT], [two], THRESHOLDS) == pytest.approx(51 / 101)
    # truths but no prediction anywhere: 0, not NaN
    assert coco_map([NONE, NONE], [G, NO_TRUTH], THRESHOLDS) == 0.0


def test_map_false_positive_ranked_first():
    # on the truth's own image: ranks FP (p 0), TP (p 1/2, recall 1) -> precision 1/2 at every recall
    fp_first = np.array([[100, 100, 140, 140, 0.95], [10, 10, 50, 50, 0.9]])
    assert coco_map([fp_first], [G], THRESHOLDS) == pytest.approx(0.5)
    # ranked last it costs nothing: precision 1 is reached at recall 1 before it
    fp_last = np.array([[10, 10, 50, 50, 0.9], [100, 100, 140, 140, 0.5]])
    assert coco_map([fp_last], [G], THRESHOLDS) == pytest.approx(1.0)
    # a lower-scored duplicate of a found box is a false positive after the recall is complete
    assert coco_map([np.concatenate([HIT, HIT * [1, 1, 1, 1, 0.5]])], [G], THRESHOLDS) == pytest.approx(1.0)


def test_map_prediction_on_image_without_truth_and_drop_empty():
    # image 2 has no truth: its prediction is a false positive ranked first; image 3's truth is missed.
    # ranks FP (recall 0), TP (precision 1/2, recall 1/2) -> precision 1/2 at the 51 recall points <= 0.5
    fp = np.array([[100, 100, 140, 140, 0.95]])
    preds, truths = [HIT, fp, NONE], [G, NO_TRUTH, G]
    assert coco_map(preds, truths, THRESHOLDS) == pytest.approx(0.5 * 51 / 101)
    # drop_empty (the reference's filter) leaves only image 1
    assert coco_map(preds, truths, THRESHOLDS, drop_empty=True) == pytest.approx(1.0)
    # without the missed image, the false positive alone halves the AP
    assert coco_map(preds[:2], truths[:2], THRESHOLDS) == pytest.approx(0.5)


def test_map_iou_thresholds_and_greedy_matching():
    # box shifted so that IoU = 30/50 = 0.6: matches at thresholds <= 0.6 (IoU >= threshold)
    shifted = np.array([[20, 10, 60, 50, 0.8]])
    np.testing.assert_allclose(coco_average_precisions([shifted], [G], THRESHOLDS),
                               [1.0 if t <= 0.6 else 0.0 for t in THRESHOLDS], atol=1e-12)  # fmt: skip
    # two truths; A (0.9) covers truth 1 with IoU 0.47, B (0.8) equals truth 1, C (0.7) equals truth 2.
    # threshold <= 0.45: A takes truth 1, B finds it taken (FP), C TP: ranks p 1, 1/2, 2/3 at recall
    #   1/2, 1/2, 1 -> precision 1 at the 51 points <= 0.5, 2/3 at the other 50;
    # threshold >= 0.5: A is a FP, B and C TP: ranks p 0, 1/2, 2/3 -> 2/3 everywhere.
    truths = [np.array([[0, 0, 100, 100], [200, 200, 300, 300]], np.float64)]
    preds = [np.array([[0, 0, 100, 47, 0.9], [0, 0, 100, 100, 0.8], [200, 200, 300, 300, 0.7]])]
    low = (51 + 50 * 2 / 3) / 101
    np.testing.assert_allclose(coco_average_precisions(preds, truths, THRESHOLDS),
                               [low if t <= 0.45 else 2 / 3 for t in THRESHOLDS], atol=1e-12)  # fmt: skip


def test_map_no_truth_at_all_is_nan():
    assert math.isnan(coco_map([HIT], [NO_TRUTH], THRESHOLDS))
    assert np.isnan(coco_average_precisions([HIT, NONE], [NO_TRUTH, NO_TRUTH], THRESHOLDS)).all()
    assert math.isnan(coco_map([], [], THRESHOLDS))
    # drop_empty leaving no image (nothing predicted where there is truth): NaN as well
    assert math.isnan(coco_map([NONE, HIT], [G, NO_TRUTH], THRESHOLDS, drop_empty=True))
    with pytest.raises(ValueError):
        coco_map([HIT], [G, G], THRESHOLDS)


def random_case(rng: np.random.Generator, n_images: int = 14, round_scores: bool = False):
    preds, truths = [], []
    for i in range(n_images):
        kind = i % 7  # 0: no truth, no prediction; 1: truth, no prediction; 2: prediction, no truth; else both
        n_t = 0 if kind in (0, 2) else int(rng.integers(1, 5))
        xy = rng.uniform(0, 150, (n_t, 2))
        wh = rng.uniform(15, 80, (n_t, 2))
        g = np.concatenate([xy, xy + wh], 1)
        p = []
        if kind >= 3:
            for box in g:  # jittered detections of most truths, sometimes two
                for _ in range(int(rng.integers(0, 3))):
                    p.append(np.append(box + rng.normal(0, 0.12 * (box[2] - box[0]), 4), rng.uniform()))
        if kind >= 2:
            for _ in range(int(rng.integers(1, 4))):  # false positives
                xy0 = rng.uniform(0, 150, 2)
                p.append(np.concatenate([xy0, xy0 + rng.uniform(10, 60, 2), [rng.uniform()]]))
        p = np.asarray(p, np.float64).reshape(-1, 5)
        if round_scores:
            p[:, 4] = np.round(p[:, 4], 1)  # ties across and within images
        p[:, 2:4] = np.maximum(p[:, 2:4], p[:, 0:2] + 1.0)
        preds.append(p)
        truths.append(g)
    return preds, truths


@pytest.mark.parametrize("seed,round_scores", [(0, False), (2, True)])
def test_map_all_images_and_drop_empty(seed, round_scores):
    """All images count (missed truths lower recall, predictions without truth are false positives);
    drop_empty equals the metric of the images that have both a prediction and a truth."""
    preds, truths = random_case(np.random.default_rng(seed), round_scores=round_scores)
    assert any(len(p) == 0 and len(g) for p, g in zip(preds, truths))  # missed images
    assert any(len(p) and len(g) == 0 for p, g in zip(preds, truths))  # false positives only
    assert any(len(p) == 0 and len(g) == 0 for p, g in zip(preds, truths))
    aps = coco_average_precisions(preds, truths, THRESHOLDS)
    assert aps.shape == (len(THRESHOLDS),) and ((aps >= 0) & (aps <= 1)).all()
    assert coco_map(preds, truths, THRESHOLDS) == pytest.approx(aps.mean(), abs=1e-12)
    keep = [i for i, (p, g) in enumerate(zip(preds, truths)) if len(p) and len(g)]
    kept = coco_map([preds[i] for i in keep], [truths[i] for i in keep], THRESHOLDS)
    assert coco_map(preds, truths, THRESHOLDS, drop_empty=True) == pytest.approx(kept, abs=1e-12)
    assert kept > coco_map(preds, truths, THRESHOLDS)  # the filter inflates the value
    # images with neither truth nor prediction change nothing
    both = [i for i, (p, g) in enumerate(zip(preds, truths)) if len(p) or len(g)]
    assert coco_map([preds[i] for i in both], [truths[i] for i in both], THRESHOLDS) == pytest.approx(aps.mean())


# ------------------------------------------------------------------------------ anchors and targets
def test_anchor_scaling():
    a416 = yolo_anchors(416)
    assert a416.shape == (9, 2)
    assert a416[0].tolist() == [10, 13] and a416[8].tolist() == [373, 326]
    a224 = yolo_anchors(224)
    torch.testing.assert_close(a224, a416 * (224 / 416))
    assert a224[6].tolist() == pytest.approx([116 * 224 / 416, 90 * 224 / 416])


def test_target_assignment_by_hand():
    grids = [(52, 52), (26, 26), (13, 13)]  # input 416
    truths = [
        np.array([[200 - 58, 150 - 45, 200 + 58, 150 + 45]]),  # 116 x 90 -> anchor 6, stride 32, cell (6, 4)
        # 12 x 14 -> anchor 0; 60 x 45 -> anchor 4
        np.array([[15, 30, 27, 44], [100 - 30, 60 - 22.5, 100 + 30, 60 + 22.5]]),
    ]
    obj, box = assign_targets(truths, yolo_anchors(416), grids)
    assert [int(o.sum()) for o in obj] == [1, 1, 1]
    assert obj[2][0, 0, 4, 6]
    np.testing.assert_allclose(box[2][0, 0, 4, 6], [200 / 32 - 6, 150 / 32 - 4, 0.0, 0.0], atol=1e-6)
    assert obj[0][1, 0, 4, 2]  # centre (21, 37) / 8 = (2.625, 4.625)
    np.testing.assert_allclose(box[0][1, 0, 4, 2], [0.625, 0.625, math.log(12 / 10), math.log(14 / 13)], atol=1e-6)
    assert obj[1][1, 1, 3, 6]  # anchor 4 = second of stride 16; centre (100, 60) / 16 = (6.25, 3.75)
    np.testing.assert_allclose(box[1][1, 1, 3, 6], [0.25, 0.75, math.log(60 / 62), 0.0], atol=1e-6)
    # input 224: the same box shape scaled by 224 / 416 still takes anchor 6, at the 7 x 7 scale
    s = 224 / 416
    obj, _ = assign_targets([truths[0] * s], yolo_anchors(224), [(28, 28), (14, 14), (7, 7)])
    assert int(obj[2].sum()) == 1 and obj[2][0, 0, 2, 3]  # centre (107.7, 80.8) / 32 = (3.37, 2.52)


def test_loss_ignore_rule_by_hand():
    """All-zero raw maps at input 416: every prediction is its anchor centred in its cell. One truth equal to
    the anchor-6 box of stride-32 cell (3, 3): positive there; the two horizontal neighbours overlap it with
    IoU 84*90 / (2*116*90 - 84*90) = 0.568 > 0.5 (ignored), the vertical ones 0.475 (kept), nothing else
    reaches 0.5. Objectness BCE at logit 0 is ln 2 per counted cell; box loss 0; class ln 2."""
    outs = [torch.zeros(1, 3, g, g, 6) for g in (52, 26, 13)]
    truth = [np.array([[112 - 58, 112 - 45, 112 + 58, 112 + 45]], np.float32)]
    _, parts = yolo_loss(outs, truth, 416)
    n_cells = 3 * (52 * 52 + 26 * 26 + 13 * 13)
    assert parts["loss_obj"] == pytest.approx(math.log(2) * (n_cells - 2), rel=1e-5)
    assert parts["loss_cls"] == pytest.approx(math.log(2), rel=1e-5)
    assert parts["loss_box"] == pytest.approx(0.0, abs=1e-10)


# --------------------------------------------------------------------------------------- decoding
def test_targets_decode_back_to_truths():
    """Raw maps built from the assigned targets (logit of the offsets, tw, th; objectness high at the
    positives) decode to the truth boxes: assignment and decoding agree, and the mAP is 1."""
    cfg = cfg_with(input_size=96)
    grids = [(12, 12), (6, 6), (3, 3)]
    truths = [np.array([[3, 4, 12, 15], [40, 30, 90, 70]], np.float32), np.zeros((0, 4), np.float32),
              np.array([[20, 50, 40, 60], [0, 0, 96, 90]], np.float32)]  # fmt: skip
    obj, box = assign_targets(truths, yolo_anchors(96), grids)
    outs = []
    for o, b in zip(obj, box):
        raw = torch.zeros(*o.shape, 6)
        off = torch.from_numpy(b[..., :2]).clamp(1e-6, 1 - 1e-6)
        raw[..., :2] = torch.log(off / (1 - off))
        raw[..., 2:4] = torch.from_numpy(b[..., 2:])
        raw[..., 4] = torch.where(torch.from_numpy(o), 10.0, -10.0)
        raw[..., 5] = 10.0
        outs.append(raw)
    dets = decode_and_nms(outs, cfg)
    for d, t in zip(dets, truths):
        assert len(d) == len(t)
        got = d[np.lexsort((d[:, 1], d[:, 0])), :4]
        np.testing.assert_allclose(got, t[np.lexsort((t[:, 1], t[:, 0]))], atol=1e-3)
    assert coco_map(dets, truths, THRESHOLDS) == pytest.approx(1.0)


def test_decode_and_nms():
    cfg = cfg_with(input_size=416)
    outs = [torch.zeros(1, 3, g, g, 6) for g in (52, 26, 13)]
    for o in outs:
        o[..., 4] = -20.0
        o[..., 5] = 20.0  # class probability ~1: score = objectness
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    outs[2][0, 0, 3, 3, 4] = logit(0.9)  # anchor 116 x 90 centred (112, 112)
    outs[2][0, 0, 3, 4, 4] = logit(0.8)  # centred (144, 112): IoU 0.568 with the first -> suppressed
    outs[2][0, 0, 10, 10, 4] = logit(0.4)  # below the confidence threshold
    outs[0][0, 1, 40, 40, 4] = logit(0.7)  # far away: kept
    (det,) = decode_and_nms(outs, cfg)
    assert det.shape == (2, 5)
    np.testing.assert_allclose(det[0], [112 - 58, 112 - 45, 112 + 58, 112 + 45, 0.9], atol=1e-4)
    np.testing.assert_allclose(det[1, :4], [324 - 8, 324 - 15, 324 + 8, 324 + 15], atol=1e-4)  # anchor 16 x 30
    assert det[1, 4] == pytest.approx(0.7, abs=1e-4)
    # the same two overlapping boxes with the lower one first in scan order: still the higher score survives
    outs[2][0, 0, 3, 3, 4], outs[2][0, 0, 3, 4, 4] = logit(0.8), logit(0.9)
    (det,) = decode_and_nms(outs, cfg)
    assert det[0, 4] == pytest.approx(0.9, abs=1e-4) and det[0, 0] == pytest.approx(144 - 58, abs=1e-4)
    # nothing above the threshold
    low = [torch.full((2, 3, g, g, 6), -3.0) for g in (52, 26, 13)]
    assert [d.shape for d in decode_and_nms(low, cfg)] == [(0, 5), (0, 5)]


def test_detector_shapes_and_frozen_trunk():
    torch.manual_seed(0)
    det = YoloDetector(resnet50_trunk())
    det.train()
    assert not det.trunk.training and det.head.training
    assert not any(p.requires_grad for p in det.trunk.parameters())
    x = torch.randn(2, 3, 64, 64)
    outs = det(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 8, 6), (2, 3, 4, 4, 6), (2, 3, 2, 2, 6)]
    det.eval()
    torch.testing.assert_close(det(x)[2], det.head(*det.features(x))[2])


# --------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_task():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32), dtype=np.uint8)
    boxes = {}
    for r in range(16):
        if r % 4 == 3:
            continue  # some rows without boxes
        x, y = rng.uniform(2, 16, 2)
        w, h = rng.uniform(6, 14, 2)
        boxes[r] = np.array([[x, y, x + w, y + h]], np.float32)
        images[r, int(y) : int(y + h), int(x) : int(x + w)] = 255
    torch.manual_seed(123)
    trunk = resnet50_trunk()
    with torch.no_grad():  # non-default BN statistics, so a train-mode pass would show
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in trunk.state_dict().items()}
    return state, images, boxes


TINY_ROWS = (np.arange(8), np.arange(8, 12), np.arange(12, 16))


def test_train_frozen_encoder_and_determinism(tiny_task):
    state, images, boxes = tiny_task
    data = task_data(images, boxes, TINY_ROWS)
    before = {k: v.clone() for k, v in state.items()}
    cfg = cfg_with()
    logs = []
    res = train_detector(state, data, cfg, "cpu", seed=7, log=logs.append, return_model=True)
    assert res["epochs_run"] == 2 and len(logs) == 2 and res["n_train"] == 8
    assert [rec["epoch"] for rec in logs] == [1, 2]  # once per epoch, numbered
    assert all({"loss", "valid_map", "best", "seconds"} <= set(rec) for rec in logs)
    assert set(res) == {"map", "map_per_iou", "best_epoch", "epochs_run", "n_train", "n_test", "n_test_scored",
                        "valid_map", "feature_seconds", "train_images_per_second", "cases", "model"}  # fmt: skip
    assert 1 <= res["best_epoch"] <= 2 and len(res["map_per_iou"]) == len(THRESHOLDS)
    assert 0.0 <= res["map"] <= 1.0 and all(math.isfinite(v["loss"]) for v in logs)
    model = res["model"]
    after = model.trunk.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights and BN running statistics bit-identical
        assert torch.equal(state[k], v), k  # the caller's state untouched
    head = model.head
    assert [s[-1][0].out_channels for s in (head.set8, head.set16, head.set32)] == list(SMALL)  # cfg.widths
    fresh = build_detector(before, seed=7, widths=SMALL).head.state_dict()
    changed = [k for k, v in model.head.state_dict().items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert any(k.endswith("weight") for k in changed) and any("out" in k for k in changed)

    res2 = train_detector(state, data, cfg, "cpu", seed=7, return_model=True)
    assert res2["map"] == res["map"] or (math.isnan(res2["map"]) and math.isnan(res["map"]))
    assert res2["map_per_iou"] == res["map_per_iou"] and res2["best_epoch"] == res["best_epoch"]
    for k, v in res2["model"].head.state_dict().items():
        assert torch.equal(v, model.head.state_dict()[k]), k


def test_train_bf16_runs(tiny_task):
    state, images, boxes = tiny_task
    cfg = cfg_with(precision="bf16", max_epochs=1, drop_empty_test=True)
    res = train_detector(state, task_data(images, boxes, TINY_ROWS), cfg, "cpu", seed=1)
    assert res["epochs_run"] == 1 and res["n_test"] == 4 and res["n_test_scored"] <= 4


# ------------------------------------------------------------------------------- subsets without a box
def test_a_test_subset_without_a_box_makes_the_map_not_evaluable(tiny_task):
    """COCO AP needs a truth box (pycocotools leaves precision at -1 without one): the cell trains, writes `map`
    as null with the reason, and every AP per IoU as null too; nothing is written as NaN."""
    import json

    state, images, boxes = tiny_task
    boxes = {r: b for r, b in boxes.items() if r not in set(TINY_ROWS[2].tolist())}
    data = task_data(images, boxes, TINY_ROWS)
    check = check_subsets(data, "det", 1)
    assert check.not_evaluable == "the test subset (4 rows) has no box: mAP needs a truth box" and not check.warnings
    res = train_detector(state, data, cfg_with(max_epochs=1), "cpu", seed=1)
    assert math.isnan(res["map"])  # the library's own value
    record = cell_record(res, "map", check.not_evaluable)
    assert record["map"] is None and record["not_evaluable"] == check.not_evaluable
    assert record["map_per_iou"] == [None] * len(THRESHOLDS) and record["n_test"] == 4
    json.dumps(record, allow_nan=False)
    reps = replicates(res["cases"], resample_indices(4, 100, 42, "det_rsna"))  # no resample has a box either
    assert np.isnan(reps).all() and interval(reps, 0.95) == (None, None)


def _without_boxes(boxes: dict, rows: np.ndarray) -> dict:
    out = {r: b for r, b in boxes.items() if r not in set(rows.tolist())}
    out[int(rows[0])] = np.zeros((0, 4), np.float32)  # an empty array is no box either
    return out


def test_a_train_subset_without_a_box_stops_the_cell(tiny_task):
    _, images, boxes = tiny_task
    data = task_data(images, _without_boxes(boxes, TINY_ROWS[0]), TINY_ROWS)
    with pytest.raises(SubsetError, match=r"the train subset at 100% \(8 rows\) has no box: nothing can be learned"):
        check_subsets(data, "det", 100)


def test_a_valid_subset_without_a_box_runs_with_a_warning(tiny_task):
    """No validation mAP picks the epoch (the tiny corpus's Object-CXR valid subset has no box): the detector
    keeps the first epoch, and the cell says so."""
    state, images, boxes = tiny_task
    data = task_data(images, _without_boxes(boxes, TINY_ROWS[1]), TINY_ROWS)
    check = check_subsets(data, "det", 10)
    assert check == SubsetCheck(None, ["the valid subset (4 rows) has no box: no validation mAP picks the epoch; "
                                       "the first epoch's head is tested"])  # fmt: skip
    res = train_detector(state, data, cfg_with(max_epochs=2), "cpu", seed=1)
    assert res["best_epoch"] == 1 and cell_record(res, "map")["valid_map"] is None


def test_an_undefined_map_without_a_known_reason_is_null_with_the_evaluators_value():
    """drop_empty_test with no test image holding both a prediction and a box: NaN from the library, null in the
    record with a reason all the same."""
    res = {"map": float("nan"), "map_per_iou": [float("nan")] * 2, "valid_map": 0.25, "n_test_scored": 0}
    record = cell_record(res, "map")
    assert record == {"map": None, "map_per_iou": [None, None], "valid_map": 0.25, "n_test_scored": 0,
                      "not_evaluable": "the evaluator returned nan for map on the test subset"}  # fmt: skip


# ------------------------------------------------------------------------------------------ learnability
def bright_squares(n: int, size: int, seed: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """An obvious detection task: dark noisy background (0..39), one bright (220) filled square of side 12..28
    per image at a random position; boxes x1, y1, x2, y2 in cache pixels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, size, size), dtype=np.uint8)
    boxes = {}
    for r in range(n):
        s = int(rng.integers(12, 29))
        x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
        images[r, y : y + s, x : x + s] = 220
        boxes[r] = np.array([[x, y, x + s, y + s]], np.float32)
    return images, boxes


def random_trunk_state(seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resnet50_trunk().state_dict()


@pytest.mark.slow  # about 15 s on one CPU thread (the trunk's features of 96 images at 224, 30 epochs of the head)
def test_detector_learns_an_obvious_task_from_a_random_trunk():
    """A broken evaluator and a hard task look the same in a table of mAP 0.0; this tells them apart. From a
    frozen RANDOM-init trunk, 30 epochs at lr 1e-3 on 48 images of one bright square must find the squares of
    32 held-out images with AP@0.5 >= 0.8 (measured: see the report of the issue; seeds fixed in advance).

    Input size 224 (the protocol's; the cache is upsampled): at 64 the same code does not learn this (AP@0.5
    about 0.1-0.2 after 15-60 epochs, measured). Every box of 12..28 px in a 64 px image is 19-44 % of it,
    which YOLOv3's anchors (scaled by input / 416) send to the stride-32 scale at any input size; at input 64
    that is a 2 x 2 grid, and the box regression from a random trunk's 2 x 2 layer4 map stays near the mean
    offset (IoU ~0.35 at the assigned cell), at 224 it is 7 x 7 (see
    test_small_input_puts_every_box_on_a_two_by_two_grid).

    conf_threshold 0.05, not the protocol's 0.5: AP ranks detections by score and integrates precision over
    recall, so a threshold only truncates the ranking; a head still calibrating its objectness (the prior
    starts it at 0.01) is cut to no prediction at all by 0.5 (then AP is 0 whatever the boxes), which would
    test the calibration's speed, not whether the detector learns. COCO practice evaluates at <= 0.05."""
    images, boxes = bright_squares(96, 64, seed=0)
    data = task_data(images, boxes, (np.arange(48), np.arange(48, 64), np.arange(64, 96)))
    cfg = cfg_with(lr=1e-3, batch_size=8, max_epochs=30, patience=30, input_size=224, conf_threshold=0.05,
                   iou_thresholds=(0.5,), eval_batch_size=32)  # fmt: skip
    res = train_detector(random_trunk_state(0), data, cfg, "cpu", seed=0)
    assert res["n_test"] == 32
    assert res["map"] >= 0.8, res


def test_small_input_puts_every_box_on_a_two_by_two_grid():
    """Why the learnability test runs at input 224: the anchors scale with the input (input / 416), so the
    assignment depends only on a box's size relative to the image; every square of 12..28 px in a 64 px image
    (19-44 % of it) goes to the stride-32 scale at any input size. At input 64 that scale's grid is 2 x 2, at
    224 it is 7 x 7."""
    _, boxes = bright_squares(96, 64, seed=0)
    truths = [boxes[r] for r in range(96)]
    obj, _ = assign_targets(truths, yolo_anchors(64), [(8, 8), (4, 4), (2, 2)])
    assert [int(o.sum()) for o in obj] == [0, 0, 96]
    obj, _ = assign_targets([t * (224 / 64) for t in truths], yolo_anchors(224), [(28, 28), (14, 14), (7, 7)])
    assert [int(o.sum()) for o in obj] == [0, 0, 96]
    assert obj[2].any(axis=(0, 1)).sum() > 4  # more than 2 x 2 distinct cells hold a positive


# ------------------------------------------------------------------------- the encoder's normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def test_the_encoders_mean_and_std_reach_its_input():
    images = np.random.default_rng(4).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    rows = np.array([3, 0, 4])
    model = build_detector(random_trunk_state(1), seed=0, widths=SMALL)
    inputs = []
    model.trunk.conv1.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().float().clone()))
    cfg = cfg_with(input_size=32, eval_batch_size=2, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    encode_features(model, images, rows, cfg, torch.device("cpu"))
    v = images[rows].astype(np.float64)[:, None] / 255.0  # grey in [0, 1], 3 channels, (x - mean_c) / std_c
    want = (v - np.asarray(IMAGENET_MEAN)[None, :, None, None]) / np.asarray(IMAGENET_STD)[None, :, None, None]
    np.testing.assert_allclose(torch.cat(inputs).numpy(), want, rtol=0, atol=2e-6)
    inputs.clear()
    encode_features(model, images, rows, cfg_with(input_size=32, eval_batch_size=8), torch.device("cpu"))
    x = torch.from_numpy(images[rows])[:, None].float()
    assert torch.equal(inputs[0], (x / 127.5 - 1.0).expand(-1, 3, -1, -1))  # the default: bit for bit as before


# ---------------------------------------------------------------------------------- bootstrap evidence
@pytest.mark.parametrize("seed,round_scores,drop_empty", [(0, False, False), (2, True, False), (3, True, True)])
def test_detection_replicates_match_a_fresh_cocoeval_on_the_resampled_images(seed, round_scores, drop_empty):
    """Reference: the resampled test set materialised, each drawn image a copy under a new image id (coco_map
    numbers the images it is given), and scored by a fresh COCOeval."""
    preds, truths = random_case(np.random.default_rng(seed), n_images=21, round_scores=round_scores)
    cases = DetectionCases.of(preds, truths, THRESHOLDS, drop_empty)
    no_truth = np.resize([i for i, g in enumerate(truths) if len(g) == 0], 21)  # no box: mAP undefined
    idx = np.vstack([resample_indices(21, 12, seed, "det_rsna"), np.arange(21), np.arange(21)[::-1], no_truth])
    got = replicates(cases, idx)
    want = [coco_map([preds[i] for i in rows], [truths[i] for i in rows], THRESHOLDS, drop_empty) for rows in idx]
    np.testing.assert_array_equal(got, want)  # bit for bit: the same matches, accumulated in the same order
    assert np.isnan(got[-1]) and not np.isnan(got[:-1]).any() and len(np.unique(got[:12])) > 6
    assert got[12] == pytest.approx(coco_map(preds, truths, THRESHOLDS, drop_empty), abs=1e-12)
    back_preds, back_truths = cases.per_image()  # the evidence holds the images as given
    for a, b in zip(back_preds + back_truths, preds + truths):
        np.testing.assert_array_equal(a, np.asarray(b, np.float64).reshape(a.shape))


def test_detection_cases_of_a_cell(tiny_task, monkeypatch):
    from mflag.finetune import detect

    predicted = []
    real = detect.predict_features
    monkeypatch.setattr(detect, "predict_features", lambda *a: predicted.append(real(*a)) or predicted[-1])
    state, images, boxes = tiny_task
    test = np.array([14, 12, 15, 13])  # the evidence follows test_rows, whatever their order
    cfg = cfg_with(max_epochs=1, conf_threshold=0.001)  # an untrained head: a low threshold keeps detections
    res = train_detector(state, task_data(images, boxes, (TINY_ROWS[0], TINY_ROWS[1], test)), cfg, "cpu", seed=1)
    cases = res["cases"]
    assert isinstance(cases, DetectionCases) and cases.n == 4 and len(cases.detections) > 4
    dets, truths = cases.per_image()
    for got, want in zip(dets, predicted[-1]):  # the test predictions, the last ones made
        np.testing.assert_array_equal(got, want)
    scale = 64 / 32  # input_size / cache side
    for r, g in zip(test, truths):
        np.testing.assert_allclose(g, boxes.get(int(r), np.zeros((0, 4))) * scale)
    assert replicates(cases, np.arange(4)[None])[0] == pytest.approx(res["map"], abs=1e-12)


@pytest.mark.parametrize("min_images, steps", [(0, 2), (8, 2), (9, 4), (20, 6)])
def test_a_small_training_subset_is_cycled_to_min_epoch_images(tiny_task, monkeypatch, min_images, steps):
    """8 training images, batch 4: one pass is 2 steps; at least 9 images need 2 passes (4 steps), 20 need 3;
    each pass is a permutation of the training rows."""
    from mflag.finetune import detect

    state, images, boxes = tiny_task
    calls: list[int] = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    seen: list[int] = []
    real_loss = detect.yolo_loss
    monkeypatch.setattr(detect, "yolo_loss", lambda outs, truths, size: seen.append(len(truths)) or real_loss(outs, truths, size))
    train_detector(state, task_data(images, boxes, TINY_ROWS), cfg_with(max_epochs=1, min_epoch_images=min_images),
                   "cpu", seed=7)
    assert len(calls) == steps and sum(seen) == 4 * steps

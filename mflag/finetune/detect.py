"""YOLOv3-style detection on a frozen ResNet-50 (MGCA protocol): jobs det_rsna and det_objcxr, one class.

Model. The pretrained ResNet-50 is frozen (``requires_grad_(False)``, always in eval mode, batch-norm
statistics untouched) and gives layer2 (512 channels, stride 8), layer3 (1024, stride 16) and layer4
(2048, stride 32). A YOLOv3 neck and head are trained on them: from the coarsest map down, a set of
five convolutions (1x1, 3x3, 1x1, 3x3, 1x1; each conv + BN + LeakyReLU 0.1), a 1x1 reduction,
nearest upsampling x2 and concatenation with the next finer map; per scale a 3x3 conv block and a 1x1
output conv giving 3 anchors x (tx, ty, tw, th, objectness, class). Widths are YOLOv3's (512 / 256 /
128 in the sets, doubled in the 3x3 convs). The output convs' objectness bias starts at logit(0.01)
(a prior, not in the YOLOv3 paper; it keeps the summed objectness BCE of the first steps small).

Anchors: the YOLOv3 COCO anchors scaled by input_size / 416; the first three belong to stride 8.

Targets and loss (YOLOv3). Each ground-truth box goes to the anchor (of all 9) whose shape (width,
height) has the best IoU with it, in the grid cell of its centre at that anchor's scale (a later box
that lands on the same anchor and cell replaces an earlier one). Loss, summed over cells and divided
by the batch size:
  * box: MSE on (sigmoid(tx), sigmoid(ty)) against the centre's offset within its cell, and on
    (tw, th) against log(box size / anchor size) -- positives only;
  * objectness: BCE, positives 1, negatives 0, except negatives whose decoded box already overlaps a
    truth of their image with IoU > 0.5, which are ignored;
  * class: BCE against 1 at the positives (one class).

Training. No augmentation and a frozen encoder: the three feature maps of every image are computed
once (no grad, eval mode, channels_last, in the configured precision) and only the neck/head is
trained on them, with torch.optim.AdamW; the validation mAP after every epoch selects the checkpoint and stops
training after `patience` epochs without improvement. Input: the uint8 cache resized bilinearly
(antialiased when shrinking) to `input_size`, grey replicated to 3 channels and normalised with the
encoder's `mean` / `std` (on grey in [0, 1]; default 0.5 / 0.5); boxes are scaled with the image.

Inference: score = sigmoid(objectness) x sigmoid(class); boxes with score > conf_threshold, clipped to
the image, greedy NMS at nms_iou (torchvision.ops.nms), at most 100 per image.

Metric: the mean over `iou_thresholds` of COCO's single-class average precision, computed by
pycocotools' COCOeval (greedy matching by score, 101-point interpolated precision, area "all", no
crowd, no cap on detections per image) over all test images: an image with no prediction or no box
still counts. With ``drop_empty`` the images with no prediction or no ground-truth box are left out
first, as the reference code does (that inflates the value; kept only for comparison).

Bootstrap evidence: the test boxes and detections (:class:`DetectionCases`), whose replicates re-run
pycocotools' accumulation on resamples of the evaluated test images.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou, nms

from mflag.finetune.data import HALF, check_normalisation, normalise_grey, passes_per_epoch
from mflag.finetune.memo import FeatureMemo, no_memo
from mflag.models import resnet50_trunk

if TYPE_CHECKING:
    from mflag.finetune.data import TaskData
    from mflag.params import DetectParams

STRIDES = (8, 16, 32)
COCO_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
ANCHORS_PER_SCALE = 3
N_OUT = 6  # tx, ty, tw, th, objectness, class
MAX_DETECTIONS = 100
IGNORE_IOU = 0.5
OBJ_PRIOR = 0.01
MAX_LOG_WH = 8.0  # clamp of tw, th when decoding (exp(8) ~ 3000 anchors wide): no inf boxes early on
TRAIN_FEATURE_WIDTHS = (512, 1024, 2048)  # layer2, layer3, layer4
YOLO_WIDTHS = (128, 256, 512)  # YOLOv3's neck widths at strides 8, 16, 32


@dataclass(frozen=True)
class DetectConfig:
    lr: float
    weight_decay: float  # MGCA: 1e-6
    batch_size: int
    max_epochs: int  # MGCA: 50
    patience: int  # MGCA: 10 (early stopping on validation mAP)
    input_size: int  # MGCA: 224
    conf_threshold: float  # 0.5
    nms_iou: float  # 0.5
    iou_thresholds: tuple[float, ...]  # 0.40, 0.45, ..., 0.75
    drop_empty_test: bool  # the reference's inflated test mAP (images without prediction or truth dropped)
    eval_batch_size: int
    precision: str  # fp32 | bf16
    widths: tuple[int, ...] = YOLO_WIDTHS  # the neck's widths at strides 8, 16, 32 (YOLOv3's by default)
    min_epoch_images: int = 0  # a smaller training subset is cycled to this many images per epoch (0: off)
    mean: tuple[float, float, float] = HALF  # the encoder's input normalisation per channel, on grey in [0, 1]
    std: tuple[float, float, float] = HALF

    def __post_init__(self) -> None:
        check_normalisation(self)

    @classmethod
    def from_params(cls, c: DetectParams, dataset: str, pct: int, precision: str) -> DetectConfig:
        """The config of a ``dataset``'s cell at data fraction ``pct`` (1, 10 or 100) from ``finetune.det``:
        learning rate and batch size of that dataset and fraction; ``precision`` as resolved for the device."""
        key = f"pct{pct}"
        return cls(lr=c.lr[dataset][key], weight_decay=c.weight_decay, batch_size=c.batch_size[dataset][key],
                   max_epochs=c.max_epochs, patience=c.patience, input_size=c.input_size,
                   conf_threshold=c.conf_threshold, nms_iou=c.nms_iou, iou_thresholds=tuple(c.iou_thresholds),
                   drop_empty_test=c.drop_empty_test, eval_batch_size=c.eval_batch_size, precision=precision,
                   widths=tuple(c.neck_widths), min_epoch_images=c.min_epoch_images)  # fmt: skip


def _autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"detection precision must be fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def yolo_anchors(input_size: int) -> torch.Tensor:
    """The 9 YOLOv3 COCO anchors (width, height) in pixels of an `input_size` input: (9, 2) float32."""
    return torch.tensor(COCO_ANCHORS, dtype=torch.float32) * (input_size / 416.0)


# ---------------------------------------------------------------------------------------------- model
class ConvBNLeaky(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.1, inplace=True),
        )


def _conv_set(c_in: int, c: int) -> nn.Sequential:
    """YOLOv3's five-conv block: 1x1 c, 3x3 2c, 1x1 c, 3x3 2c, 1x1 c."""
    return nn.Sequential(
        ConvBNLeaky(c_in, c, 1), ConvBNLeaky(c, 2 * c, 3), ConvBNLeaky(2 * c, c, 1), ConvBNLeaky(c, 2 * c, 3),
        ConvBNLeaky(2 * c, c, 1),
    )  # fmt: skip


class YoloHead(nn.Module):
    """Neck + head on (stride 8, 16, 32) maps -> 3 raw maps (B, 3, H, W, 6), finest first."""

    def __init__(self, in_channels: Sequence[int] = TRAIN_FEATURE_WIDTHS, widths: Sequence[int] = YOLO_WIDTHS,
                 n_anchors: int = ANCHORS_PER_SCALE):  # fmt: skip
        super().__init__()
        c8, c16, c32 = in_channels
        w8, w16, w32 = widths
        self.n_anchors = n_anchors
        self.set32 = _conv_set(c32, w32)
        self.reduce32 = ConvBNLeaky(w32, w16, 1)
        self.set16 = _conv_set(c16 + w16, w16)
        self.reduce16 = ConvBNLeaky(w16, w8, 1)
        self.set8 = _conv_set(c8 + w8, w8)
        self.out = nn.ModuleList(
            nn.Sequential(ConvBNLeaky(w, 2 * w, 3), nn.Conv2d(2 * w, n_anchors * N_OUT, 1)) for w in (w8, w16, w32)
        )
        prior = math.log(OBJ_PRIOR / (1.0 - OBJ_PRIOR))
        with torch.no_grad():
            for branch in self.out:
                bias = branch[-1].bias.view(n_anchors, N_OUT)
                bias.zero_()
                bias[:, 4] = prior

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # x2 nearest upsampling; `size` also covers inputs that are not multiples of 32
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def forward(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> list[torch.Tensor]:
        x32 = self.set32(f32)
        x16 = self.set16(torch.cat([self._up(self.reduce32(x32), f16), f16], 1))
        x8 = self.set8(torch.cat([self._up(self.reduce16(x16), f8), f8], 1))
        outs = []
        for branch, x in zip(self.out, (x8, x16, x32)):
            y = branch(x)
            b, _, h, w = y.shape
            outs.append(y.view(b, self.n_anchors, N_OUT, h, w).permute(0, 1, 3, 4, 2))
        return outs


class YoloDetector(nn.Module):
    """Frozen ResNet-50 trunk + trainable YOLOv3 neck/head. forward(images) -> 3 raw maps (B, 3, H, W, 6)."""

    def __init__(self, trunk: nn.Module, widths: Sequence[int] = YOLO_WIDTHS):
        super().__init__()
        self.trunk = trunk
        self.trunk.requires_grad_(False)
        self.trunk.eval()
        self.head = YoloHead(TRAIN_FEATURE_WIDTHS, widths)

    def train(self, mode: bool = True) -> "YoloDetector":
        super().train(mode)
        self.trunk.eval()  # frozen: batch-norm statistics never move
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """layer2, layer3, layer4 maps (strides 8, 16, 32) of the frozen trunk."""
        self.trunk.eval()
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(images))))
        c2 = t.layer2(t.layer1(x))
        c3 = t.layer3(c2)
        c4 = t.layer4(c3)
        return c2, c3, c4

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.head(*self.features(images))


def build_detector(trunk_state: dict, seed: int, widths: Sequence[int] = YOLO_WIDTHS) -> YoloDetector:
    """The detector of train_detector before training: the trunk from (a copy of) `trunk_state`, the head
    drawn from `seed`."""
    with torch.device("meta"):  # no random init of 25M weights that are overwritten at once
        trunk = resnet50_trunk()
    trunk.load_state_dict({k: v.detach().clone() for k, v in trunk_state.items()}, assign=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return YoloDetector(trunk, widths)


# ------------------------------------------------------------------------------------ decoding, targets
def _decode_boxes(raw: torch.Tensor, anchors: torch.Tensor, stride: int) -> torch.Tensor:
    """raw (B, A, H, W, >=4), anchors (A, 2) -> boxes (B, A, H, W, 4) x1, y1, x2, y2 in input pixels."""
    _, a, h, w, _ = raw.shape
    gy = torch.arange(h, device=raw.device, dtype=raw.dtype).view(1, 1, h, 1)
    gx = torch.arange(w, device=raw.device, dtype=raw.dtype).view(1, 1, 1, w)
    cx = (raw[..., 0].sigmoid() + gx) * stride
    cy = (raw[..., 1].sigmoid() + gy) * stride
    aw = anchors[:, 0].to(raw).view(1, a, 1, 1)
    ah = anchors[:, 1].to(raw).view(1, a, 1, 1)
    bw = aw * raw[..., 2].clamp(max=MAX_LOG_WH).exp()
    bh = ah * raw[..., 3].clamp(max=MAX_LOG_WH).exp()
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def decode_and_nms(outputs: Sequence[torch.Tensor], cfg: DetectConfig) -> list[np.ndarray]:
    """Raw maps -> per image an (n, 5) float32 array x1, y1, x2, y2, score (input pixels), best first."""
    anchors = yolo_anchors(cfg.input_size)
    boxes, scores = [], []
    for s, (raw, stride) in enumerate(zip(outputs, STRIDES)):
        raw = raw.detach().float()
        b = raw.shape[0]
        anc = anchors[s * ANCHORS_PER_SCALE : (s + 1) * ANCHORS_PER_SCALE]
        boxes.append(_decode_boxes(raw, anc, stride).reshape(b, -1, 4))
        scores.append((raw[..., 4].sigmoid() * raw[..., 5].sigmoid()).reshape(b, -1))
    boxes_all = torch.cat(boxes, 1).clamp_(0.0, float(cfg.input_size))
    scores_all = torch.cat(scores, 1)
    result = []
    for bx, sc in zip(boxes_all, scores_all):
        keep = sc > cfg.conf_threshold
        bx, sc = bx[keep], sc[keep]
        if len(sc):
            k = nms(bx, sc, cfg.nms_iou)[:MAX_DETECTIONS]  # indices by decreasing score
            bx, sc = bx[k], sc[k]
        result.append(torch.cat([bx, sc[:, None]], 1).cpu().numpy().astype(np.float32))
    return result


def assign_targets(
    truths: Sequence[np.ndarray], anchors: torch.Tensor, grid_sizes: Sequence[tuple[int, int]]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """YOLOv3 assignment. truths: per image (n, 4) x1, y1, x2, y2 in input pixels; anchors (9, 2);
    grid_sizes: (H, W) per scale, finest first. Returns per scale `obj` (B, 3, H, W) bool and `box`
    (B, 3, H, W, 4) float32 targets: centre offset in the cell (x, y), log(w / anchor w), log(h / anchor h)."""
    anc = anchors.detach().cpu().double().numpy()
    bsz = len(truths)
    obj = [np.zeros((bsz, ANCHORS_PER_SCALE, h, w), bool) for h, w in grid_sizes]
    box = [np.zeros((bsz, ANCHORS_PER_SCALE, h, w, 4), np.float32) for h, w in grid_sizes]
    for b, t in enumerate(truths):
        for x1, y1, x2, y2 in np.asarray(t, np.float64).reshape(-1, 4):
            bw, bh = x2 - x1, y2 - y1
            if not (bw > 0 and bh > 0):
                continue
            inter = np.minimum(bw, anc[:, 0]) * np.minimum(bh, anc[:, 1])
            shape_iou = inter / (bw * bh + anc[:, 0] * anc[:, 1] - inter)
            k = int(np.argmax(shape_iou))
            s, a = divmod(k, ANCHORS_PER_SCALE)
            stride, (gh, gw) = STRIDES[s], grid_sizes[s]
            fx, fy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            gx = min(max(int(math.floor(fx)), 0), gw - 1)
            gy = min(max(int(math.floor(fy)), 0), gh - 1)
            obj[s][b, a, gy, gx] = True
            box[s][b, a, gy, gx] = (
                min(max(fx - gx, 0.0), 1.0),
                min(max(fy - gy, 0.0), 1.0),
                math.log(bw / anc[k, 0]),
                math.log(bh / anc[k, 1]),
            )
    return obj, box


def _pairwise_iou_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, N, 4), b (B, T, 4) x1y1x2y2 -> (B, N, T): torchvision's box_iou per image.

    Why a wrapper: box_iou takes one (N, 4) x (T, 4) pair; flattening the batch would compute the B x B
    cross-image blocks too. NaN (0 / 0, two empty boxes) becomes 0, so that it cannot hide a real overlap
    in the max over truths."""
    return torch.stack([box_iou(x, y) for x, y in zip(a, b)]).nan_to_num_(0.0)


def yolo_loss(
    outputs: Sequence[torch.Tensor], truths: Sequence[np.ndarray], input_size: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The YOLOv3 loss of raw maps (float) against per-image truth boxes in input pixels; see the module doc."""
    device = outputs[0].device
    bsz = outputs[0].shape[0]
    anchors = yolo_anchors(input_size)
    obj_t, box_t = assign_targets(truths, anchors, [tuple(o.shape[2:4]) for o in outputs])
    valid = [np.asarray(t, np.float32).reshape(-1, 4) for t in truths]
    n_max = max((len(t) for t in valid), default=0)
    padded = torch.zeros(bsz, max(n_max, 1), 4)
    present = torch.zeros(bsz, max(n_max, 1), dtype=torch.bool)
    for b, t in enumerate(valid):
        padded[b, : len(t)] = torch.from_numpy(t)
        present[b, : len(t)] = True
    padded, present = padded.to(device), present.to(device)
    loss_box = outputs[0].new_zeros(())
    loss_obj = outputs[0].new_zeros(())
    loss_cls = outputs[0].new_zeros(())
    for s, raw in enumerate(outputs):
        pos = torch.from_numpy(obj_t[s]).to(device)
        tgt = torch.from_numpy(box_t[s]).to(device)
        with torch.no_grad():
            anc = anchors[s * ANCHORS_PER_SCALE : (s + 1) * ANCHORS_PER_SCALE]
            pred = _decode_boxes(raw.detach(), anc, STRIDES[s]).reshape(bsz, -1, 4)
            iou = _pairwise_iou_batched(pred, padded).masked_fill(~present[:, None, :], 0.0)
            ignore = (iou.amax(-1) > IGNORE_IOU).view(pos.shape) & ~pos
        counted = ~ignore
        loss_obj = loss_obj + F.binary_cross_entropy_with_logits(
            raw[..., 4][counted], pos[counted].to(raw.dtype), reduction="sum"
        )
        if pos.any():
            p, t = raw[pos], tgt[pos]
            loss_box = loss_box + ((p[:, :2].sigmoid() - t[:, :2]) ** 2).sum() + ((p[:, 2:4] - t[:, 2:]) ** 2).sum()
            loss_cls = loss_cls + F.binary_cross_entropy_with_logits(p[:, 5], torch.ones_like(p[:, 5]), reduction="sum")
    total = (loss_box + loss_obj + loss_cls) / bsz
    parts = {"loss_box": loss_box.item() / bsz, "loss_obj": loss_obj.item() / bsz, "loss_cls": loss_cls.item() / bsz}
    return total, parts


# ------------------------------------------------------------------------------------------------ metric
def _pred_array(p) -> np.ndarray:
    return np.asarray(p, np.float64).reshape(-1, 5)


def _truth_array(g) -> np.ndarray:
    return np.asarray(g, np.float64).reshape(-1, 4)


def _evaluated(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou_thresholds: Sequence[float], keep: Sequence[bool]
) -> COCOeval | None:
    """pycocotools' COCOeval after ``evaluate()`` of the images with ``keep`` (image i has id i + 1), or None
    where none of them has a truth box. Call inside a stdout redirection (COCO and COCOeval print progress)."""
    images, gts, dts, max_dets = [], [], [], MAX_DETECTIONS
    for image_id, (p, g, k) in enumerate(zip(preds, truths, keep), start=1):
        if not k:
            continue
        p, g = _pred_array(p), _truth_array(g)
        images.append({"id": image_id})
        max_dets = max(max_dets, len(p))
        for x1, y1, x2, y2 in g.tolist():
            w, h = x2 - x1, y2 - y1
            gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": 1, "bbox": [x1, y1, w, h],
                        "area": w * h, "iscrowd": 0})  # fmt: skip
        for x1, y1, x2, y2, score in p.tolist():
            w, h = x2 - x1, y2 - y1
            dts.append({"id": len(dts) + 1, "image_id": image_id, "category_id": 1, "bbox": [x1, y1, w, h],
                        "area": w * h, "iscrowd": 0, "score": score})  # fmt: skip
    if not gts:
        # pycocotools leaves precision at -1 when no image has a truth box (and refuses to accumulate an
        # evaluation without images): no AP is defined
        return None
    categories = [{"id": 1, "name": "box"}]
    coco_gt, coco_dt = COCO(), COCO()
    # the results are built like the ground truth, not by COCO.loadRes, which fails on an empty list
    # (an untrained head may predict nothing); the fields are loadRes's for boxes
    coco_gt.dataset = {"images": images, "annotations": gts, "categories": categories}
    coco_dt.dataset = {"images": images, "annotations": dts, "categories": categories}
    coco_gt.createIndex()
    coco_dt.createIndex()
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.iouThrs = np.asarray(iou_thresholds, np.float64)
    ev.params.maxDets = [max_dets]
    ev.params.areaRng = [[0.0, 1e5**2]]
    ev.params.areaRngLbl = ["all"]
    ev.evaluate()
    return ev


def _accumulated_aps(ev: COCOeval) -> np.ndarray:
    """``accumulate()`` and the AP per IoU threshold (NaN where pycocotools leaves -1: no truth box)."""
    ev.accumulate()
    precision = ev.eval["precision"][:, :, 0, 0, 0]  # (thresholds, 101 recall points)
    return np.where((precision < 0).any(1), np.nan, precision.mean(1))


def _scored(p: np.ndarray, g: np.ndarray, drop_empty: bool) -> bool:
    """Whether an image counts: every image does, unless ``drop_empty`` (then those with a prediction and a box)."""
    return not drop_empty or (len(p) > 0 and len(g) > 0)


def coco_average_precisions(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou_thresholds: Sequence[float], drop_empty: bool = False
) -> np.ndarray:
    """Per IoU threshold, COCO's single-class AP over all images, by pycocotools' COCOeval (area "all",
    no crowd, 101 recall points, no cap on detections per image). preds: per image (n, 5) x1, y1, x2, y2,
    score; truths: per image (m, 4). Every image counts, with or without boxes or predictions, unless
    ``drop_empty`` (then only those with both). NaN where there is no truth box at all (pycocotools: -1)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} prediction lists for {len(truths)} images")
    keep = [_scored(_pred_array(p), _truth_array(g), drop_empty) for p, g in zip(preds, truths)]
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
        ev = _evaluated(preds, truths, iou_thresholds, keep)
        return np.full(len(iou_thresholds), np.nan) if ev is None else _accumulated_aps(ev)


def coco_map(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou_thresholds: Sequence[float], drop_empty: bool = False
) -> float:
    """Mean over `iou_thresholds` of coco_average_precisions (NaN when no image has a truth box)."""
    return float(np.mean(coco_average_precisions(preds, truths, iou_thresholds, drop_empty)))


@dataclass(frozen=True)
class DetectionCases:
    """A detection cell's test images (in ``data.test_rows`` order) for the bootstrap: every image's truth boxes
    and detections, flat, image by image: ``boxes`` (M, 4) x1, y1, x2, y2 with ``box_image`` (M,) the image
    index of each, ``detections`` (K, 5) x1, y1, x2, y2, score with ``detection_image`` (K,), both in input
    pixels as the metric saw them; ``n`` images; and the metric's settings."""

    n: int
    boxes: np.ndarray
    box_image: np.ndarray
    detections: np.ndarray
    detection_image: np.ndarray
    iou_thresholds: tuple[float, ...]
    drop_empty: bool

    @classmethod
    def of(cls, preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], iou_thresholds: Sequence[float],
           drop_empty: bool) -> DetectionCases:  # fmt: skip
        """The evidence of per-image detections ``preds`` (n, 5) and ``truths`` (m, 4), as coco_map takes them."""
        if len(preds) != len(truths):
            raise ValueError(f"{len(preds)} prediction lists for {len(truths)} images")
        p = [_pred_array(x) for x in preds]
        g = [_truth_array(x) for x in truths]
        n = len(p)
        return cls(n=n, boxes=np.concatenate(g) if g else np.zeros((0, 4)),
                   box_image=np.repeat(np.arange(n), [len(x) for x in g]),
                   detections=np.concatenate(p) if p else np.zeros((0, 5)),
                   detection_image=np.repeat(np.arange(n), [len(x) for x in p]),
                   iou_thresholds=tuple(float(t) for t in iou_thresholds), drop_empty=bool(drop_empty))  # fmt: skip

    def per_image(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(detections, truths) of each image, as coco_map takes them."""

        def split(values: np.ndarray, image: np.ndarray) -> list[np.ndarray]:
            return np.split(values, np.cumsum(np.bincount(image, minlength=self.n))[:-1]) if self.n else []

        return split(self.detections, self.detection_image), split(self.boxes, self.box_image)

    def replicates(self, idx: np.ndarray) -> np.ndarray:
        """(B,) the mAP (mean over the IoU thresholds, as :func:`coco_map`) on each row of image indices ``idx``
        (B, m): the images of the row in its order, a drawn image counting as many times as drawn.

        pycocotools' own matching and accumulation: every image is matched once (``evaluate()``; an image's
        matches do not depend on the other images), then for each resample ``evalImgs`` is rebuilt in the
        resample's order and ``accumulate()`` run on it, which is what a fresh COCOeval on the resampled
        images, each copy under a new image id, computes (tests/test_detect.py)."""
        out = np.full(len(idx), np.nan)
        preds, truths = self.per_image()
        counts = np.array([_scored(p, g, self.drop_empty) for p, g in zip(preds, truths)], dtype=bool)
        with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
            ev = _evaluated(preds, truths, self.iou_thresholds, [True] * self.n)
            if ev is None:  # no truth box in the test set: no resample has one
                return out
            # one category, one area range: evalImgs[i] is image id i + 1's match record (None: no box, no detection)
            matched = list(ev.evalImgs)
            for b, rows in enumerate(np.asarray(idx)):
                rows = rows[counts[rows]]
                ids = list(range(1, len(rows) + 1))  # accumulate() reads evalImgs by position in imgIds
                ev.evalImgs = [matched[r] for r in rows]
                ev.params.imgIds = ids
                ev._paramsEval.imgIds = ids
                out[b] = np.mean(_accumulated_aps(ev))
        return out


# -------------------------------------------------------------------------------------------- training
def _prepare_images(images_u8: np.ndarray, rows: np.ndarray, cfg: DetectConfig, device: torch.device) -> torch.Tensor:
    """The encoder's input (B, 3, s, s) of `rows`: resized to ``cfg.input_size``, normalised with cfg.mean / std."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8[rows])).to(device)
    x = x[:, None].float()
    size = cfg.input_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalise_grey(x, cfg.mean, cfg.std).contiguous(memory_format=torch.channels_last)


def encode_features(
    model: YoloDetector, images_u8: np.ndarray, rows: np.ndarray, cfg: DetectConfig, device: torch.device
) -> list[torch.Tensor]:
    """The frozen trunk's three maps for `rows`, in the storage dtype (bf16 under bf16, else fp32); kept on
    the device when they take under half of its free memory, else on the host."""
    dtype = _autocast_dtype(cfg.precision)
    store_dtype = dtype or torch.float32
    rows = np.asarray(rows, np.int64)
    n, s = len(rows), cfg.input_size
    sizes = [(c, -(-s // st)) for c, st in zip(TRAIN_FEATURE_WIDTHS, STRIDES)]
    model.trunk.to(device, memory_format=torch.channels_last)
    store = torch.device("cpu")
    if device.type == "cuda":
        need = n * sum(c * g * g for c, g in sizes) * torch.finfo(store_dtype).bits // 8
        if need < 0.5 * torch.cuda.mem_get_info(device)[0]:
            store = device
    feats: list[torch.Tensor] | None = None
    for start in range(0, n, cfg.eval_batch_size):
        x = _prepare_images(images_u8, rows[start : start + cfg.eval_batch_size], cfg, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            maps = model.features(x)
        if feats is None:
            feats = [torch.empty((n, *m.shape[1:]), dtype=store_dtype, device=store) for m in maps]
        for f, m in zip(feats, maps):
            f[start : start + len(m)] = m.to(store, store_dtype)
    if feats is None:
        feats = [torch.empty((0, c, g, g), dtype=store_dtype, device=store) for c, g in sizes]
    return feats


def _scaled_truths(boxes: dict[int, np.ndarray], rows: np.ndarray, scale: float) -> list[np.ndarray]:
    out = []
    for r in rows:
        b = boxes.get(int(r))
        b = np.zeros((0, 4), np.float32) if b is None else np.asarray(b, np.float32).reshape(-1, 4)
        out.append(b * np.float32(scale))
    return out


@torch.no_grad()
def predict_features(
    head: YoloHead, feats: list[torch.Tensor], cfg: DetectConfig, device: torch.device
) -> list[np.ndarray]:
    """decode_and_nms of the head's outputs on cached feature maps, in eval_batch_size batches."""
    head.eval()
    dtype = _autocast_dtype(cfg.precision)
    preds: list[np.ndarray] = []
    for start in range(0, len(feats[0]), cfg.eval_batch_size):
        x = [f[start : start + cfg.eval_batch_size].to(device, non_blocking=True) for f in feats]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outs = head(*x)
        preds.extend(decode_and_nms([o.float() for o in outs], cfg))
    return preds


def train_detector(
    trunk_state: dict,
    data: TaskData,
    cfg: DetectConfig,
    device: torch.device | str,
    seed: int,
    log: Callable[[dict], None] | None = None,
    return_model: bool = False,
    memo: FeatureMemo | None = None,
    return_head: bool = False,
) -> dict:
    """Train the YOLOv3 neck/head on the frozen trunk and score the test rows.

    Reads ``data.images`` ((N, S, S) uint8), ``data.boxes`` (cache row -> (n, 4) x1, y1, x2, y2 in cache
    pixels; rows without boxes absent or empty) and ``data.train_rows``, ``valid_rows``, ``test_rows``.
    Returns {"map", "map_per_iou", "best_epoch", "epochs_run", "n_train", "n_test", "n_test_scored",
    "valid_map", "feature_seconds", "train_images_per_second", "cases"} (+ "model", on the CPU, with
    return_model); ``cases``, the bootstrap evidence for :func:`mflag.stats.replicates`, is the test images'
    boxes and detections (:class:`DetectionCases`, in ``test_rows`` order).
    A trailing batch of a single image is dropped (train-mode batch norm on a 1x1 map cannot take it).
    `log`: called once per epoch with that epoch's record ("epoch", the mean losses, "valid_map", "best",
    "seconds").
    `memo`: called as ``memo("valid" | "test", compute)``, may return a stored result of ``compute()`` (the
    frozen trunk's maps of that split, which every fraction of a job shares) instead of calling it.
    `return_head`: also "head", the state of the tested neck and head (the detector's keys ``head.*``, on the CPU).
    """
    device = torch.device(device)
    _autocast_dtype(cfg.precision)
    images_u8, boxes = data.images, data.boxes
    train_rows, valid_rows, test_rows = (
        np.asarray(r, np.int64) for r in (data.train_rows, data.valid_rows, data.test_rows)
    )
    if len(train_rows) == 0:
        raise ValueError("detection: no training rows")
    scale = cfg.input_size / images_u8.shape[-1]
    model = build_detector(trunk_state, seed, cfg.widths).to(device)
    head = model.head
    dtype = _autocast_dtype(cfg.precision)

    t0 = time.perf_counter()
    train_feats = encode_features(model, images_u8, train_rows, cfg, device)
    memo = memo or no_memo
    valid_feats = memo("valid", lambda: encode_features(model, images_u8, valid_rows, cfg, device))
    feature_seconds = time.perf_counter() - t0
    train_truths = _scaled_truths(boxes, train_rows, scale)
    valid_truths = _scaled_truths(boxes, valid_rows, scale)

    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    n_train = len(train_rows)
    best_map, best_epoch, best_state, waited, epochs_run = -math.inf, 0, copy.deepcopy(head.state_dict()), 0, 0
    best_valid_map = float("nan")
    train_time, train_seen = 0.0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        rng = np.random.default_rng([seed, epoch])
        perm = np.concatenate([rng.permutation(n_train) for _ in range(passes_per_epoch(n_train, cfg.min_epoch_images))])
        batches = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()
        sums = {"loss": 0.0, "loss_box": 0.0, "loss_obj": 0.0, "loss_cls": 0.0}
        te = time.perf_counter()
        for idx in batches:
            it = torch.from_numpy(idx)
            x = [f[it.to(f.device)].to(device, non_blocking=True) for f in train_feats]
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                outs = head(*x)
            loss, parts = yolo_loss([o.float() for o in outs], [train_truths[i] for i in idx], cfg.input_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += loss.item() * len(idx)
            for k, v in parts.items():
                sums[k] += v * len(idx)
        seen = sum(len(b) for b in batches)
        train_time += time.perf_counter() - te
        train_seen += seen
        valid_preds = predict_features(head, valid_feats, cfg, device)
        valid_aps = coco_average_precisions(valid_preds, valid_truths, cfg.iou_thresholds)
        valid_map = float(np.mean(valid_aps))
        epochs_run = epoch
        score = -1.0 if math.isnan(valid_map) else valid_map  # no validation box: the first epoch stays best
        improved = score > best_map
        if improved:
            best_map, best_epoch, waited, best_valid_map = score, epoch, 0, valid_map
            best_state = copy.deepcopy(head.state_dict())
        else:
            waited += 1
        if log is not None:
            log({"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}, "valid_map": valid_map,
                 "best": improved, "seconds": time.perf_counter() - te})  # fmt: skip
        if waited >= cfg.patience:
            break

    head.load_state_dict(best_state)
    del train_feats, valid_feats
    t1 = time.perf_counter()
    test_feats = memo("test", lambda: encode_features(model, images_u8, test_rows, cfg, device))
    feature_seconds += time.perf_counter() - t1
    test_truths = _scaled_truths(boxes, test_rows, scale)
    test_preds = predict_features(head, test_feats, cfg, device)
    aps = coco_average_precisions(test_preds, test_truths, cfg.iou_thresholds, drop_empty=cfg.drop_empty_test)
    n_scored = len(test_rows)
    if cfg.drop_empty_test:
        n_scored = sum(1 for p, g in zip(test_preds, test_truths) if len(p) and len(g))
    result = {
        "map": float(np.mean(aps)),
        "map_per_iou": [float(a) for a in aps],
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "n_train": n_train,
        "n_test": len(test_rows),
        "n_test_scored": n_scored,
        "valid_map": best_valid_map,
        "feature_seconds": feature_seconds,
        "train_images_per_second": train_seen / train_time if train_time > 0 else float("nan"),
        "cases": DetectionCases.of(test_preds, test_truths, cfg.iou_thresholds, cfg.drop_empty_test),
    }
    if return_head:
        result["head"] = {f"head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
    if return_model:
        result["model"] = model.cpu()
    return result

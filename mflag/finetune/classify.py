"""Linear-probe classification on a frozen image encoder (the MGCA protocol M-FLAG follows).

Jobs ``cls_chexpert`` (5 labels, multi-label, BCE-with-logits, macro AUC), ``cls_nih`` (14 labels, the
same), ``cls_rsna`` (1 label, BCE, AUC) and ``cls_covidx`` (3 classes, cross-entropy, accuracy). The whole
encoder is frozen, batch-norm statistics included (``requires_grad_(False)`` and ``eval()`` at every step); only a linear layer
``feature_dim -> classes`` is trained with ``torch.optim.AdamW``. Early stopping on the validation loss
(``patience`` epochs without a strict improvement); the test metrics are those of the head with the lowest
validation loss. AUCs are scikit-learn's ``roc_auc_score``.

Inputs are a job's :class:`~mflag.finetune.data.TaskData`: the uint8 cache ``(N, S, S)``, the labels of all
N rows (``kind``) and the rows of each split. Training crops are random crops of side ``crop`` (with
``augment``), plus for CheXpert (``moco_aug``) a MoCo-v2-style colour jitter, Gaussian blur and horizontal
flip, all done batched on tensors; evaluation crops are centre crops. Crops and augmentation work on pixels
normalised with mean = std = 0.5; at the encoder's input they are normalised with the encoder's own
``cfg.mean`` / ``cfg.std`` instead (``(x - mean_c) / std_c`` on grey in [0, 1] replicated to 3 channels; a
no-op for the default 0.5 / 0.5) and optionally upsampled (bilinear) to ``upsample`` pixels.

Two training paths:

* cached features (``augment`` False, the default): every image's crop is deterministic, so the frozen
  encoder's features are computed once (:func:`encode_features`, or passed in via ``features=``) and the
  head is trained on them. This is what makes the CPU demo and the three data fractions cheap.
* on the fly (``augment`` True, or ``cache_features=False``): each training batch goes through the
  encoder (without autograd). Validation and test crops are deterministic in both paths, so their
  features are always computed once.

Randomness: everything comes from generators seeded by ``seed`` (head init, batch order and augmentation
each have their own stream, so the batch order does not depend on whether augmentation is drawn); the
global RNG is never used.

Bootstrap evidence: :func:`probe_over_seeds` returns the probes' test logits and labels (:class:`ProbeCases`),
from which :func:`mflag.stats.replicates` computes the cell's metric on resamples of the test cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as nnf
from sklearn.metrics import roc_auc_score

from mflag.augment import center_crop_normalize
from mflag.finetune.data import HALF, check_normalisation, renormalise
from mflag.models import FEATURE_DIM, resnet50_trunk

if TYPE_CHECKING:
    from mflag.finetune.data import TaskData
    from mflag.params import ClassifyParams

__all__ = [
    "ClassifyConfig",
    "KINDS",
    "LinearProbes",
    "ProbeCases",
    "ProbeClassifier",
    "build_classifier",
    "encode_features",
    "linear_probe",
    "probe_over_seeds",
    "macro_auc",
    "accuracy",
    "random_crop_normalize",
    "moco_photometric",
]

KINDS = ("multilabel", "binary", "multiclass")

# MoCo-v2's photometric augmentation on grey images (saturation / hue are no-ops there):
# RandomApply([ColorJitter(0.4, 0.4, ...)], p=0.8), GaussianBlur(sigma in [0.1, 2.0]) with p=0.5,
# RandomHorizontalFlip(p=0.5).
JITTER_P = 0.8
BRIGHTNESS = 0.4
CONTRAST = 0.4
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
FLIP_P = 0.5


@dataclass(frozen=True)
class ClassifyConfig:
    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    crop: int
    upsample: int  # bilinear upsampling of the crop to this side before the encoder; 0 = off
    augment: bool  # random crops for training (else centre crops, and cached features)
    moco_aug: bool  # MoCo-v2 colour jitter / blur / flip on top of the random crop (CheXpert); only with augment
    eval_batch_size: int
    precision: str  # "fp32" | "bf16" (autocast for the encoder forward)
    mean: tuple[float, float, float] = HALF  # the encoder's input normalisation per channel, on grey in [0, 1]
    std: tuple[float, float, float] = HALF

    def __post_init__(self) -> None:
        check_normalisation(self)
        for name in ("batch_size", "max_epochs", "patience", "crop", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.upsample < 0:
            raise ValueError(f"ClassifyConfig.upsample must be >= 0 (0 = off), got {self.upsample}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"ClassifyConfig: lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"ClassifyConfig.precision must be fp32 or bf16, got {self.precision!r}")

    @classmethod
    def from_params(cls, c: ClassifyParams, dataset: str, pct: int, precision: str) -> ClassifyConfig:
        """The config of a ``dataset``'s cells from ``finetune.cls``: MoCo-v2 photometric augmentation only
        for CheXpert, and only with ``augment``; ``precision`` as resolved for the device. ``pct`` is unused
        (the same for every fraction); it is there so that every evaluator's config is built one way."""
        return cls(lr=c.lr, weight_decay=c.weight_decay, batch_size=c.batch_size, max_epochs=c.max_epochs,
                   patience=c.patience, crop=c.crop, upsample=c.upsample, augment=c.augment,
                   moco_aug=c.augment and dataset == "chexpert", eval_batch_size=c.eval_batch_size,
                   precision=precision)  # fmt: skip


# --------------------------------------------------------------------------------------------- metrics
def _defined(y: np.ndarray) -> bool:
    y = np.asarray(y).reshape(-1)
    return len(y) > 0 and 0 < int(np.asarray(y, dtype=bool).sum()) < len(y)


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, list]:
    """Macro AUC over the columns of ``(N, K)`` labels / scores.

    Returns ``(macro, per_label)``: ``per_label[k]`` is column k's AUC (scikit-learn's ``roc_auc_score``;
    ties count one half), or None where column k has a single class (skipped from the mean). ``macro`` is
    NaN when every column is skipped.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.shape != s.shape:
        raise ValueError(f"macro_auc: labels {y.shape} and scores {s.shape} differ")
    per_label = [float(roc_auc_score(y[:, k], s[:, k])) if _defined(y[:, k]) else None for k in range(y.shape[1])]
    done = [a for a in per_label if a is not None]
    return (float(np.mean(done)) if done else float("nan")), per_label


def accuracy(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Top-1 accuracy: ``logits`` (N, C) -> argmax; (N,) or (N, 1) binary logits -> ``logit > 0``."""
    y = np.asarray(y_true).reshape(-1)
    z = np.asarray(logits)
    if z.ndim == 2 and z.shape[1] > 1:
        pred = z.argmax(axis=1)
    else:
        pred = (z.reshape(-1) > 0).astype(np.int64)
    if len(pred) != len(y):
        raise ValueError(f"accuracy: {len(y)} labels but {len(pred)} predictions")
    if len(y) == 0:
        return float("nan")
    return float((pred == y.astype(np.int64)).mean())


# ------------------------------------------------------------------------------------ bootstrap evidence
REPLICATE_CHUNK = 1 << 22  # resamples x cases weighed per step of the AUC replicates: ~40 bytes each of working arrays


@dataclass(frozen=True)
class ProbeCases:
    """What a cell's probes did on each test case (rows in ``data.test_rows`` order), for the bootstrap.

    ``metric`` "auc": the cell reports the mean over probes of :func:`macro_auc` (the labels with a single class
    among the cases are skipped; a probe's value is NaN when every label is); ``scores`` (P, n, L) float32 are
    the P probes' test logits, ``labels`` (n, L) bool. ``metric`` "acc" (multiclass): the mean over probes of
    :func:`accuracy`; ``scores`` (P, n, C) logits, ``labels`` (n,) int64 class ids.
    """

    metric: str
    scores: np.ndarray
    labels: np.ndarray

    @property
    def n(self) -> int:
        return int(self.scores.shape[1])

    def replicates(self, idx: np.ndarray) -> np.ndarray:
        """(B,) the cell's metric on each row of test-case indices ``idx`` (B, m)."""
        if self.metric == "acc":
            z = self.scores
            pred = z.argmax(-1) if z.shape[-1] > 1 else (z[..., 0] > 0).astype(np.int64)
            hits = (pred == self.labels[None, :]).mean(0)  # (n,): per case, the share of probes right
            return hits[idx].mean(1) if idx.shape[1] else np.full(len(idx), np.nan)
        return _auc_replicates(self.scores, self.labels, idx)


def _auc_replicates(scores: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean over probes of the macro AUC on each resample: scores (P, n, L), labels (n, L) bool, idx (B, m).

    A resample is a count per case (how often it was drawn), and its AUC is the Mann-Whitney U of the weighted
    cases over n_pos n_neg: U = sum over positives i of w_i (negative weight below s_i + half the negative weight
    tied with s_i), equal to roc_auc_score on the resampled arrays. Why by hand: roc_auc_score (with
    sample_weight) is one call per resample, probe and label (minutes per study); here the cases are sorted once
    per probe and label and every resample is one cumulative sum of its weights in that order."""
    p, n, k = scores.shape
    m = idx.shape[1]
    out = np.empty(len(idx))
    y = labels.astype(bool)
    step = max(1, REPLICATE_CHUNK // max(n, 1))
    for a in range(0, len(idx), step):
        rows = idx[a : a + step]  # (b, m)
        b = len(rows)
        counts = np.zeros((b, n))
        np.add.at(counts, (np.repeat(np.arange(b), m), rows.reshape(-1)), 1.0)  # (b, n): times each case was drawn
        n_pos = counts @ y  # (b, L)
        n_neg = m - n_pos
        defined = (n_pos > 0) & (n_neg > 0)  # a label with one class in the resample is skipped
        auc = np.zeros((p, k, b))
        for q in range(p):
            for lab in range(k):
                order = np.argsort(scores[q, :, lab], kind="stable")
                s = scores[q, order, lab]
                is_first = np.r_[True, s[1:] != s[:-1]]
                is_last = np.r_[s[1:] != s[:-1], True]
                first = np.maximum.accumulate(np.where(is_first, np.arange(n), 0))  # each case's tie group: start,
                last = np.minimum.accumulate(np.where(is_last, np.arange(n), n - 1)[::-1])[::-1]  # and end
                w = counts[:, order]
                neg = w * ~y[order, lab]
                upto = np.cumsum(neg, axis=1)  # negative weight up to and including each case
                below = upto - neg
                u = 0.5 * ((w * y[order, lab]) * (below[:, first] + upto[:, last])).sum(1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    auc[q, lab] = np.where(defined[:, lab], u / (n_pos[:, lab] * n_neg[:, lab]), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            macro = auc.sum(1) / defined.sum(1)  # (P, b); 0 / 0 = NaN where every label is skipped
        out[a : a + step] = macro.mean(0)
    return out


def _probe_cases(kind: str, y_test: np.ndarray, logits: np.ndarray) -> ProbeCases:
    """The evidence of P probes: their test logits (P, n, K) and the test labels as :func:`_targets` gives them."""
    logits = np.asarray(logits, dtype=np.float32)
    if kind == "multiclass":
        return ProbeCases("acc", logits, np.asarray(y_test, dtype=np.int64).reshape(-1))
    labels = np.asarray(y_test).reshape(len(y_test), -1).astype(bool)
    return ProbeCases("auc", logits.reshape(logits.shape[0], len(labels), -1), labels)


# ---------------------------------------------------------------------------------------- transforms
def random_crop_normalize(x: torch.Tensor, crop: int, generator: torch.Generator, channels: int = 3) -> torch.Tensor:
    """Per-sample random crops of uint8 ``(B, H, W)`` images (offsets like ``RandomCrop``), mean = std = 0.5.

    Returns float32 ``(B, channels, crop, crop)`` on ``x.device``; offsets drawn on ``generator`` (CPU).
    """
    b, h, w = x.shape
    if h < crop or w < crop:
        raise ValueError(f"crop {crop} is larger than the input {h}x{w}")
    u = torch.rand(b, 2, dtype=torch.float64, generator=generator)
    top = torch.clamp((u[:, 0] * (h - crop + 1)).floor(), max=h - crop).long().to(x.device)
    left = torch.clamp((u[:, 1] * (w - crop + 1)).floor(), max=w - crop).long().to(x.device)
    ar = torch.arange(crop, device=x.device)
    rows = (top[:, None] + ar)[:, :, None]  # (B, c, 1)
    cols = (left[:, None] + ar)[:, None, :]  # (B, 1, c)
    out = x[torch.arange(b, device=x.device)[:, None, None], rows, cols]  # (B, c, c)
    out = out[:, None].to(torch.float32) / 127.5 - 1.0
    if channels != 1:
        out = out.expand(b, channels, crop, crop).contiguous()
    return out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with a per-sample ``sigma`` (B,), reflect padding."""
    b, c, h, w = x.shape
    radius = int(math.ceil(3.0 * BLUR_SIGMA[1]))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.device, torch.float32)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, K)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    mode = "reflect" if min(h, w) > radius else "replicate"
    y = x.reshape(1, b * c, h, w)
    y = nnf.conv2d(nnf.pad(y, (radius, radius, 0, 0), mode=mode), k[:, None, None, :], groups=b * c)
    y = nnf.conv2d(nnf.pad(y, (0, 0, radius, radius), mode=mode), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def moco_photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MoCo-v2's colour jitter (brightness / contrast 0.4, random order, p 0.8), Gaussian blur
    (sigma U[0.1, 2.0], p 0.5) and horizontal flip (p 0.5) on normalised ``(B, C, H, W)`` grey images.

    Works in [0, 1] intensities like torchvision (``(x + 1) / 2``), clamps after each jitter step, and
    returns mean = std = 0.5 normalised images again. Parameters drawn on ``generator`` (CPU).
    """
    b = x.shape[0]
    dev = x.device
    u = torch.rand(b, 7, dtype=torch.float32, generator=generator).to(dev)
    jitter = u[:, 0] < JITTER_P
    f_b = torch.where(jitter, 1.0 - BRIGHTNESS + 2.0 * BRIGHTNESS * u[:, 1], torch.ones_like(u[:, 1]))
    f_c = torch.where(jitter, 1.0 - CONTRAST + 2.0 * CONTRAST * u[:, 2], torch.ones_like(u[:, 2]))
    brightness_first = (u[:, 3] < 0.5)[:, None, None, None]
    blur = u[:, 4] < BLUR_P
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 5]
    flip = (u[:, 6] < FLIP_P)[:, None, None, None]

    v = (x + 1.0) * 0.5
    fb = f_b[:, None, None, None]
    fc = f_c[:, None, None, None]

    def bright(t):
        return (t * fb).clamp(0.0, 1.0)

    def contrast(t):  # blend with the image's mean grey level, as torchvision's adjust_contrast
        m = t.mean(dim=(1, 2, 3), keepdim=True)
        return (fc * t + (1.0 - fc) * m).clamp(0.0, 1.0)

    v = torch.where(brightness_first, contrast(bright(v)), bright(contrast(v)))
    idx = torch.nonzero(blur).flatten()
    if idx.numel():
        v = v.clone()
        v[idx] = _gaussian_blur(v[idx], sigma[idx])
    v = torch.where(flip, v.flip(-1), v)
    return v * 2.0 - 1.0


# ------------------------------------------------------------------------------------------- encoder
def _autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp32": None}[precision]


def _freeze(trunk: nn.Module) -> None:
    trunk.requires_grad_(False)
    trunk.eval()


def _prepare_trunk(trunk: nn.Module, device: torch.device, channels_last: bool) -> None:
    trunk.to(device)
    if channels_last:  # a layout change only (values untouched); oneDNN / cuDNN's fast kernels want NHWC
        trunk.to(memory_format=torch.channels_last)
    _freeze(trunk)


def _trunk_forward(trunk: nn.Module, x: torch.Tensor, cfg: ClassifyConfig, channels_last: bool) -> torch.Tensor:
    """Crops (B, 3, c, c) normalised with mean = std = 0.5 -> float32 features (B, D) of the encoder's input
    (``cfg.mean`` / ``cfg.std``, upsampled), without autograd, encoder frozen."""
    _freeze(trunk)
    x = renormalise(x, cfg.mean, cfg.std)
    if cfg.upsample:
        x = nnf.interpolate(x, size=(cfg.upsample, cfg.upsample), mode="bilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _autocast_dtype(cfg.precision)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        h = trunk(x)
    return h.flatten(1).float()


def _load_u8(images_u8: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    batch = np.ascontiguousarray(images_u8[rows])
    if batch.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    return torch.from_numpy(batch).to(device, non_blocking=True)


def encode_features(
    trunk: nn.Module,
    images_u8: np.ndarray,
    rows: np.ndarray,
    cfg: ClassifyConfig,
    device: torch.device | str,
    progress: bool = True,
    channels_last: bool = True,
) -> np.ndarray:
    """Frozen-encoder features of ``images_u8[rows]``: centre crop (+ upsample), eval mode, no grad.

    Returns float32 ``(len(rows), D)`` in the order of ``rows``. Batched by ``cfg.eval_batch_size``.
    The trunk is moved to ``device`` and (``channels_last``) to the channels-last layout in place.
    """
    device = torch.device(device)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    _prepare_trunk(trunk, device, channels_last)
    chunks = []
    from tqdm import tqdm

    bs = cfg.eval_batch_size
    for i in tqdm(range(0, len(rows), bs), desc="features", leave=False, disable=not progress):
        x = center_crop_normalize(_load_u8(images_u8, rows[i : i + bs], device), cfg.crop)
        chunks.append(_trunk_forward(trunk, x, cfg, channels_last).cpu())
    if not chunks:
        with torch.no_grad():  # the feature width, for an empty selection
            x = torch.zeros(1, 3, cfg.upsample or cfg.crop, cfg.upsample or cfg.crop, device=device)
            d = trunk(x).flatten(1).shape[1]
        return np.zeros((0, d), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------- the probe
def _targets(labels: np.ndarray, kind: str) -> tuple[torch.Tensor, int]:
    """All N labels as the loss expects them, and the head's output width."""
    if kind == "multilabel":
        y = np.asarray(labels, dtype=np.float32)
        if y.ndim != 2:
            raise ValueError(f"multilabel labels must be (N, K), got shape {y.shape}")
        return torch.from_numpy(y), y.shape[1]
    if kind == "binary":
        y = np.asarray(labels, dtype=np.float32)
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise ValueError(f"binary labels must be (N,) or (N, 1), got shape {y.shape}")
        return torch.from_numpy(y.reshape(-1, 1)), 1
    if kind == "multiclass":
        y = np.asarray(labels)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"multiclass labels must be (N,) integer class ids, got {y.dtype} {y.shape}")
        if len(y) and y.min() < 0:
            raise ValueError("multiclass labels must be >= 0")
        return torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1 if len(y) else 0
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _loss(kind: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if kind == "multiclass":
        return nnf.cross_entropy(logits, y, reduction=reduction)
    return nnf.binary_cross_entropy_with_logits(logits, y, reduction=reduction)


def _metrics(kind: str, y: np.ndarray, logits: np.ndarray) -> dict:
    if kind == "multilabel":
        macro, per_label = macro_auc(y, logits)
        return {"auc": macro, "auc_per_label": per_label, "auc_skipped": [k for k, a in enumerate(per_label) if a is None]}
    if kind == "binary":
        y = y.reshape(-1)
        return {"auc": float(roc_auc_score(y, logits.reshape(-1))) if _defined(y) else float("nan")}
    out = {"acc": accuracy(y, logits)}
    n_cls = logits.shape[1]
    prob = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    onehot = (y[:, None] == np.arange(n_cls)[None, :]).astype(np.float64)
    macro, per_class = macro_auc(onehot, prob)
    if not math.isnan(macro):
        out["auc"] = macro
        out["auc_skipped"] = [k for k, a in enumerate(per_class) if a is None]
    return out


def _main_metric(kind: str) -> str:
    return "acc" if kind == "multiclass" else "auc"


def _init_head(d_in: int, d_out: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default init (U(-1/sqrt(d_in), 1/sqrt(d_in))), drawn from ``generator``."""
    head = nn.Linear(d_in, d_out)
    bound = 1.0 / math.sqrt(d_in) if d_in > 0 else 0.0
    with torch.no_grad():
        head.weight.copy_(torch.rand(d_out, d_in, generator=generator) * (2 * bound) - bound)
        head.bias.copy_(torch.rand(d_out, generator=generator) * (2 * bound) - bound)
    return head


def _evaluate(head: nn.Linear, feats: torch.Tensor, y: torch.Tensor, kind: str, bs: int) -> tuple[float, np.ndarray]:
    """Mean loss and logits of the head on cached features (on the head's device)."""
    head.eval()
    total = 0.0
    out = []
    with torch.no_grad():
        for i in range(0, len(feats), bs):
            z = head(feats[i : i + bs])
            total += _loss(kind, z, y[i : i + bs], reduction="sum").item()
            out.append(z.float().cpu())
    n = len(feats) * (y.shape[1] if y.dim() == 2 else 1)  # BCE's mean is over elements
    return total / max(n, 1), torch.cat(out).numpy() if out else np.zeros((0, head.out_features), np.float32)


def _rows(*rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """train / valid / test row indices as flat int64 arrays; none may be empty."""
    out = tuple(np.asarray(r, dtype=np.int64).reshape(-1) for r in rows)
    if any(len(r) == 0 for r in out):
        raise ValueError(f"linear_probe needs train, valid and test rows, got {', '.join(str(len(r)) for r in out)}")
    return out


def _probe_inputs(
    data: TaskData, features: np.ndarray | None, device: torch.device
) -> tuple[tuple[np.ndarray, ...], tuple[torch.Tensor, ...], int]:
    """The checked train / valid / test rows, their targets on ``device`` and the number of outputs."""
    if data.labels is None:
        raise ValueError(f"linear_probe: the task data of {data.dataset!r} has no labels (not a cls job)")
    rows = _rows(data.train_rows, data.valid_rows, data.test_rows)
    y_all, n_out = _targets(data.labels, data.kind)
    if features is not None and len(features) != len(y_all):
        raise ValueError(f"features has {len(features)} rows but labels {len(y_all)}: pass features of ALL rows")
    return rows, tuple(y_all[torch.from_numpy(r)].to(device) for r in rows), n_out


def _stored_features(features: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features[rows], dtype=np.float32)).to(device)


def linear_probe(
    trunk: nn.Module | None,
    data: TaskData,
    cfg: ClassifyConfig,
    device: torch.device | str,
    seed: int,
    features: np.ndarray | None = None,
    log: Callable[[dict], None] | None = None,
    *,
    progress: bool = True,
    cache_features: bool = True,
    channels_last: bool = True,
) -> dict:
    """Train a linear head on the frozen ``trunk`` and return the test metrics of the best epoch.

    ``data.kind``: "multilabel" (labels (N, K) 0/1), "binary" (labels (N,) or (N, 1) 0/1) or "multiclass"
    (labels (N,) integer class ids); ``data.*_rows`` index the N images / labels. ``features``: optional
    (N, D) features of ALL rows (as :func:`encode_features` gives), used when ``cfg.augment`` is False;
    then ``trunk`` may be None and ``data.images`` is not read. ``cache_features=False`` forces the
    on-the-fly path even without augmentation (same result as the cached path up to floating-point
    batching effects).
    ``log``: called once per epoch with {"epoch", "train_loss", "valid_loss", "valid_metric"} (epochs
    count from 1).

    Returns {"auc" | "acc" (+ "auc"), ..., "best_epoch", "epochs_run", "n_train", "best_valid_loss"}:
    multilabel adds "auc_per_label" (None where a label has one class in test) and "auc_skipped".
    """
    return _linear_probe(trunk, data, cfg, device, seed, features, log, progress=progress,
                         cache_features=cache_features, channels_last=channels_last)[0]  # fmt: skip


def _linear_probe(
    trunk: nn.Module | None,
    data: TaskData,
    cfg: ClassifyConfig,
    device: torch.device | str,
    seed: int,
    features: np.ndarray | None,
    log: Callable[[dict], None] | None,
    *,
    progress: bool,
    cache_features: bool,
    channels_last: bool,
) -> tuple[dict, np.ndarray, nn.Linear]:
    """:func:`linear_probe`'s result, the best head's test logits (n_test, K) float32 and that head."""
    device = torch.device(device)
    kind, images_u8 = data.kind, data.images
    rows, (y_train, y_valid, y_test), n_out = _probe_inputs(data, features, device)
    train_rows, valid_rows, test_rows = rows
    on_the_fly = cfg.augment or not cache_features
    if trunk is not None:
        if on_the_fly or features is None:
            _prepare_trunk(trunk, device, channels_last)
        else:  # unused: features are given
            _freeze(trunk)
    elif on_the_fly or features is None:
        raise ValueError("linear_probe: a trunk is needed unless features are given and augment is False")

    def feats_of(rows: np.ndarray) -> torch.Tensor:
        if features is not None:
            return _stored_features(features, rows, device)
        return torch.from_numpy(encode_features(trunk, images_u8, rows, cfg, device, progress, channels_last)).to(device)

    f_valid, f_test = feats_of(valid_rows), feats_of(test_rows)
    f_train = None if on_the_fly else feats_of(train_rows)
    d_in = f_valid.shape[1]

    g_init = torch.Generator().manual_seed(seed)
    g_order = torch.Generator().manual_seed(seed + 1_000_003)
    g_aug = torch.Generator().manual_seed(seed + 2_000_006)
    head = _init_head(d_in, n_out, g_init).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)

    best = {"loss": math.inf, "epoch": 0, "state": None}
    bad = 0
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        perm = torch.randperm(len(train_rows), generator=g_order)
        head.train()
        loss_sum, n_seen = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if on_the_fly:
                x = _load_u8(images_u8, train_rows[idx.numpy()], device)
                if cfg.augment:
                    x = random_crop_normalize(x, cfg.crop, g_aug)
                    if cfg.moco_aug:
                        x = moco_photometric(x, g_aug)
                else:
                    x = center_crop_normalize(x, cfg.crop)
                f = _trunk_forward(trunk, x, cfg, channels_last)
            else:
                f = f_train[idx.to(device)]
            yb = y_train[idx.to(device)]
            loss = _loss(kind, head(f), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            n_seen += len(idx)
        valid_loss, valid_logits = _evaluate(head, f_valid, y_valid, kind, cfg.eval_batch_size)
        if log is not None:
            valid_metric = _metrics(kind, y_valid.cpu().numpy(), valid_logits)[_main_metric(kind)]
            log({"epoch": epoch, "train_loss": loss_sum / n_seen, "valid_loss": valid_loss, "valid_metric": valid_metric})
        if valid_loss < best["loss"]:
            best = {"loss": valid_loss, "epoch": epoch, "state": {k: v.detach().clone() for k, v in head.state_dict().items()}}
            bad = 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best["state"] is None:  # every validation loss was NaN: keep the last head
        best = {"loss": float("nan"), "epoch": epoch, "state": head.state_dict()}
    head.load_state_dict(best["state"])
    _, test_logits = _evaluate(head, f_test, y_test, kind, cfg.eval_batch_size)
    out = _metrics(kind, y_test.cpu().numpy(), test_logits)
    out.update(best_epoch=int(best["epoch"]), epochs_run=int(epoch), n_train=int(len(train_rows)),
               best_valid_loss=float(best["loss"]))  # fmt: skip
    return out, test_logits, head


def _head_losses(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-element losses of S heads, (S, B, K) logits against (S, B, K) 0/1 targets or (S, B) class ids,
    as (S, elements): B x K for BCE, B for cross-entropy (so that a row's mean is :func:`_loss`'s mean)."""
    heads = logits.shape[0]
    if kind == "multiclass":
        return nnf.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none").view(heads, -1)
    return nnf.binary_cross_entropy_with_logits(logits, y, reduction="none").view(heads, -1)


def _heads_logits(weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, bs: int) -> torch.Tensor:
    """(S, N, K) logits of S heads on the same (N, D) features, in chunks of ``bs`` rows."""
    heads, k, d = weight.shape
    flat_w, flat_b = weight.reshape(heads * k, d), bias.reshape(heads * k)
    chunks = [torch.addmm(flat_b, feats[i : i + bs], flat_w.t()) for i in range(0, len(feats), bs)]
    z = torch.cat(chunks) if chunks else feats.new_zeros((0, heads * k))
    return z.view(len(feats), heads, k).transpose(0, 1)


class LinearProbes(nn.Module):
    """P linear probes on the same features: ``weight`` (P, K, D), ``bias`` (P, K); ``forward(features (N, D))``
    -> logits (P, N, K). What a cell trains (one probe per seed) and what its head file holds
    (mflag.finetune.heads); not trained as a module (the probes train as two stacked tensors)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        if weight.dim() != 3 or tuple(bias.shape) != tuple(weight.shape[:2]):
            raise ValueError(f"LinearProbes: weight (P, K, D) and bias (P, K), got {tuple(weight.shape)}, {tuple(bias.shape)}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        return _heads_logits(self.weight, self.bias, features, batch_size)


class ProbeClassifier(nn.Module):
    """A cell's classifier: the frozen ``trunk`` and its :class:`LinearProbes` (``probes``), for ``cfg``'s inputs.

    ``forward(x)``: crops (B, 3, c, c) normalised with mean = std = 0.5, as :func:`~mflag.augment.center_crop_normalize`
    gives them, -> logits (P, B, K), through the evaluator's own encoder path (``cfg.mean`` / ``cfg.std``,
    ``cfg.upsample``, ``cfg.precision``). ``predict(images_u8)``: the cell's evaluation path on uint8 (N, S, S)
    images (centre crops, :func:`encode_features`), logits (P, N, K) float32 as numpy."""

    def __init__(self, trunk: nn.Module, probes: LinearProbes, cfg: ClassifyConfig):
        super().__init__()
        self.trunk, self.probes, self.cfg = trunk, probes, cfg
        _freeze(trunk)

    def train(self, mode: bool = True) -> "ProbeClassifier":
        super().train(mode)
        _freeze(self.trunk)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probes(_trunk_forward(self.trunk, x, self.cfg, channels_last=True), self.cfg.eval_batch_size)

    @torch.no_grad()
    def predict(self, images_u8: np.ndarray) -> np.ndarray:
        device = self.probes.weight.device
        feats = encode_features(self.trunk, images_u8, np.arange(len(images_u8)), self.cfg, device, progress=False)
        return self.probes(torch.from_numpy(feats).to(device), self.cfg.eval_batch_size).float().cpu().numpy()


def build_classifier(trunk_state: dict[str, torch.Tensor], n_probes: int, n_out: int, cfg: ClassifyConfig,
                     feature_dim: int = FEATURE_DIM) -> ProbeClassifier:  # fmt: skip
    """The classifier of a cell's head file before its probes are loaded: a ResNet-50 trunk holding
    ``trunk_state`` (as the stage builds it), frozen, and ``n_probes`` zero probes ``feature_dim -> n_out``."""
    with torch.device("meta"):  # no random init of 25M weights that are overwritten at once
        trunk = resnet50_trunk()
    trunk.load_state_dict({k: v.detach().clone() for k, v in trunk_state.items()}, assign=True)
    probes = LinearProbes(torch.zeros(n_probes, n_out, feature_dim), torch.zeros(n_probes, n_out))
    return ProbeClassifier(trunk, probes, cfg)


def _probe_heads(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_valid: torch.Tensor,
    y_valid: torch.Tensor,
    f_test: torch.Tensor,
    y_test: torch.Tensor,
    kind: str,
    n_out: int,
    cfg: ClassifyConfig,
    seeds: list[int],
    log: Callable[[dict], None] | None,
) -> tuple[list[dict], np.ndarray, LinearProbes]:
    """:func:`linear_probe`'s cached-feature path for several seeds at once: one head per seed, with that
    seed's init, batch order and early stopping, the heads stacked into one (S, K, D) weight so that a step
    is one batched product instead of S small ones (AdamW is element-wise, so the heads stay independent).
    A head that has stopped leaves the batch. Equal to S separate probes up to floating-point summation
    order (tests/test_classify.py). ``log`` receives the first seed's curve. Returns each seed's result, the
    heads' test logits (S, n_test, K) float32 and the heads of the best epochs (:class:`LinearProbes`)."""
    heads, n, d_in = len(seeds), len(f_train), f_train.shape[1]
    inits = [_init_head(d_in, n_out, torch.Generator().manual_seed(s)) for s in seeds]
    weight = nn.Parameter(torch.stack([h.weight.detach() for h in inits]).to(f_train.device))
    bias = nn.Parameter(torch.stack([h.bias.detach() for h in inits]).to(f_train.device))
    orders = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]
    # One optimizer, no state slicing: AdamW is element-wise and every active head steps once per batch,
    # so a stopped head's rows (zero grads from then on, never read again) cannot change the others' numbers.
    opt = torch.optim.AdamW([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    valid_elems = len(f_valid) * (y_valid.shape[1] if y_valid.dim() == 2 else 1)  # BCE's mean is over elements

    best_loss, best_epoch, bad = [math.inf] * heads, [0] * heads, [0] * heads
    stopped: list[int | None] = [None] * heads  # the epoch each head stopped at
    best_w, best_b = weight.detach().clone(), bias.detach().clone()

    def stop(h: int, at: int) -> None:
        stopped[h] = at
        if best_epoch[h] == 0:  # every validation loss was NaN: keep the last head
            best_w[h], best_b[h] = weight[h].detach(), bias[h].detach()
            best_loss[h], best_epoch[h] = float("nan"), at

    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        active = [h for h in range(heads) if stopped[h] is None]
        act = torch.tensor(active, device=f_train.device)
        perms = torch.stack([torch.randperm(n, generator=orders[h]) for h in active]).to(f_train.device)
        first_sum, n_seen = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = perms[:, i : i + cfg.batch_size]  # (A, B)
            w, b = (weight, bias) if len(active) == heads else (weight.index_select(0, act), bias.index_select(0, act))
            f = f_train.index_select(0, idx.reshape(-1)).view(*idx.shape, d_in)
            # (A, K, D) x (A, D, B): with K a handful, this orientation is ~4x faster on CPU than (A, B, D) x (A, D, K)
            z = torch.bmm(w, f.transpose(1, 2)).transpose(1, 2) + b.unsqueeze(1)
            per_head = _head_losses(kind, z, y_train.index_select(0, idx.reshape(-1)).view(*idx.shape, *y_train.shape[1:])).mean(1)
            opt.zero_grad(set_to_none=True)
            per_head.sum().backward()
            opt.step()
            if log is not None and active[0] == 0:
                first_sum += per_head[0].item() * idx.shape[1]
            n_seen += idx.shape[1]
        with torch.no_grad():
            z_valid = _heads_logits(weight, bias, f_valid, cfg.eval_batch_size)
            y_rep = y_valid.unsqueeze(0).expand(heads, *y_valid.shape)
            valid_loss = _head_losses(kind, z_valid, y_rep).double().sum(1) / max(valid_elems, 1)
        for h in active:
            loss = float(valid_loss[h])
            if h == 0 and log is not None:
                metric = _metrics(kind, y_valid.cpu().numpy(), z_valid[0].float().cpu().numpy())[_main_metric(kind)]
                log({"epoch": epoch, "train_loss": first_sum / n_seen, "valid_loss": loss, "valid_metric": metric})
            if loss < best_loss[h]:
                best_loss[h], best_epoch[h], bad[h] = loss, epoch, 0
                best_w[h], best_b[h] = weight[h].detach(), bias[h].detach()
            else:
                bad[h] += 1
                if bad[h] >= cfg.patience:
                    stop(h, epoch)
        if all(e is not None for e in stopped):
            break
    for h in range(heads):
        if stopped[h] is None:
            stop(h, epoch)
    best = LinearProbes(best_w, best_b)
    with torch.no_grad():
        z_test = best(f_test, cfg.eval_batch_size).float().cpu().numpy()
    y_test_np = y_test.cpu().numpy()
    runs = []
    for h in range(heads):
        out = _metrics(kind, y_test_np, z_test[h])
        out.update(best_epoch=int(best_epoch[h]), epochs_run=int(stopped[h]), n_train=int(n),
                   best_valid_loss=float(best_loss[h]))  # fmt: skip
        runs.append(out)
    return runs, z_test, best


def probe_over_seeds(
    trunk: nn.Module | None,
    data: TaskData,
    cfg: ClassifyConfig,
    device: torch.device | str,
    seeds: list[int],
    features: np.ndarray | None = None,
    log: Callable[[dict], None] | None = None,
    *,
    progress: bool = True,
    return_head: bool = False,
) -> dict:
    """:func:`linear_probe` once per seed in ``seeds``, on the same data; the cell reports the mean.

    With a handful of training images the probe's own seed (head init, batch order) moves a test AUC by
    several points (docs/design.md, "Linear probe"), so one run cannot rank two encoders whose difference is
    smaller than that. Returns the mean over seeds of each test metric (``auc``, ``acc``, and for
    multi-label ``auc_per_label``, None where every seed skipped the label), ``<metric>_sd`` (the sample
    standard deviation over seeds, with two seeds or more), ``n_train``, ``seeds``, ``per_seed``: each
    seed's own result (as :func:`linear_probe` returns it, plus ``seed``), and ``cases``: the test evidence
    (:class:`ProbeCases`, test cases in ``data.test_rows`` order) for :func:`mflag.stats.replicates`. ``log``
    receives the curves of the first seed only. ``return_head``: also ``head``, the probes of the best epochs, which gave the
    test logits of ``cases``: ``probes.weight`` (P, K, D) and ``probes.bias`` (P, K), one per seed in ``seeds``
    order, on the CPU (the state of :class:`ProbeClassifier` without its frozen trunk).
    """
    if not seeds:
        raise ValueError("probe_over_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"probe_over_seeds: seeds repeat: {seeds}")
    seeds = [int(s) for s in seeds]
    kind = data.kind
    if features is None and not cfg.augment and trunk is not None:  # one feature pass serves every seed
        features = encode_features(trunk, data.images, np.arange(len(data.images)), cfg, device, progress)
    if cfg.augment or features is None:  # each seed's training crops go through the encoder
        probes = [_linear_probe(trunk, data, cfg, device, s, features, log if i == 0 else None, progress=progress,
                                cache_features=True, channels_last=True) for i, s in enumerate(seeds)]  # fmt: skip
        results = [r for r, _, _ in probes]
        test_logits = np.stack([z for _, z, _ in probes])
        heads = LinearProbes(torch.stack([h.weight.detach() for _, _, h in probes]),
                             torch.stack([h.bias.detach() for _, _, h in probes]))  # fmt: skip
    else:  # cached features: the heads train together
        device = torch.device(device)
        rows, y, n_out = _probe_inputs(data, features, device)
        f = [_stored_features(features, r, device) for r in rows]
        results, test_logits, heads = _probe_heads(f[0], y[0], f[1], y[1], f[2], y[2], kind, n_out, cfg, seeds, log)
    runs = [{"seed": s, **r} for s, r in zip(seeds, results)]
    out: dict = {}
    for name in ("auc", "acc"):
        values = [r[name] for r in runs if name in r]
        if len(values) == len(runs):
            out[name] = float(np.mean(values))
            if len(values) > 1:
                out[f"{name}_sd"] = float(np.std(values, ddof=1))
    if kind == "multilabel":
        per = [[r["auc_per_label"][k] for r in runs if r["auc_per_label"][k] is not None]
               for k in range(len(runs[0]["auc_per_label"]))]  # fmt: skip
        out["auc_per_label"] = [float(np.mean(v)) if v else None for v in per]
    out.update(n_train=runs[0]["n_train"], seeds=[r["seed"] for r in runs], per_seed=runs)
    test_rows = np.asarray(data.test_rows, dtype=np.int64).reshape(-1)
    out["cases"] = _probe_cases(kind, _targets(data.labels, kind)[0][torch.from_numpy(test_rows)].numpy(), test_logits)
    if return_head:  # keyed as in ProbeClassifier's state dict
        out["head"] = {f"probes.{k}": v.detach().cpu() for k, v in heads.state_dict().items()}
    return out

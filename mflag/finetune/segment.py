"""The shared segmenter (MGCA protocol): a U-Net on a frozen ResNet-50 encoder, for `seg_siim` and `seg_rsna`.

Model: MGCA's segmentation-models-pytorch ``Unet("resnet50", classes=1)``, built with smp itself; its encoder
is loaded strictly from a pretrained trunk (torchvision ResNet-50 key names, ``fc`` removed) and frozen:
``requires_grad_(False)`` and kept in ``eval()`` (batch-norm statistics never move). Only the decoder and
the head train.

Loss (MGCA's ``MixedLoss``): ``10 * focal(gamma 2) - log(soft Dice, smooth 1)``. AdamW, early stopping on
the validation loss, the best epoch's decoder is tested. Metric: Dice per image at 0.5 on the sigmoid
(an empty truth scores 1 for an empty prediction, 0 otherwise), averaged over the test images.

Data: the uint8 cache ``(N, S, S)`` with its 0/1 masks, moved once to the device; each batch is resized
there to ``input_size`` (bilinear, masks nearest), augmented with a batched shift-scale-rotate (one
``grid_sample`` for image and mask together, the mask thresholded at 0.5), replicated to 3 channels and
normalised with the encoder's ``cfg.mean`` / ``cfg.std`` (on grey in [0, 1]; default 0.5 / 0.5). All
randomness (balancing, decoder init, order, augmentation) comes from ``seed``; the global RNG is left as it was.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from mflag.finetune.data import HALF, check_normalisation, normalise_grey, passes_per_epoch
from mflag.finetune.memo import FeatureMemo, no_memo

if TYPE_CHECKING:
    from mflag.finetune.data import TaskData
    from mflag.params import SegmentParams

__all__ = [
    "SegmentConfig",
    "ShiftScaleRotate",
    "build_unet",
    "segment_images",
    "dice_per_image",
    "focal_loss",
    "soft_dice",
    "segmentation_loss",
    "shift_scale_rotate",
    "balanced_rows",
    "train_segmenter",
]

FOCAL_WEIGHT = 10.0  # MGCA MixedLoss(alpha=10)
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0
THRESHOLD = 0.5
DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's Unet default, as MGCA used it


@dataclass(frozen=True)
class SegmentConfig:
    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int  # epochs without a lower validation loss before stopping
    input_size: int  # side the cache is resized to (MGCA: 224); a multiple of 32
    augment: bool  # shift-scale-rotate on the training batches
    balance: bool  # train on every positive image plus as many negatives (SIIM)
    eval_batch_size: int  # test predictions only (the validation loss uses batch_size, as MGCA's loader)
    precision: str  # "fp32" | "bf16" (autocast; bf16 also runs in channels_last)
    decoder_channels: tuple[int, ...] = DECODER_CHANNELS  # smp's default (256, 128, 64, 32, 16)
    min_epoch_images: int = 0  # a smaller training subset is cycled to this many images per epoch (0: off)
    prior: float | None = None  # the head's initial foreground probability (None: smp's init)
    mean: tuple[float, float, float] = HALF  # the encoder's input normalisation per channel, on grey in [0, 1]
    std: tuple[float, float, float] = HALF

    def __post_init__(self) -> None:
        check_normalisation(self)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"SegmentConfig.precision must be fp32 or bf16, got {self.precision!r}")
        if self.input_size < 32 or self.input_size % 32:
            raise ValueError(f"SegmentConfig.input_size must be a positive multiple of 32 (U-Net stride), got {self.input_size}")
        if self.prior is not None and not 0.0 < self.prior < 1.0:
            raise ValueError(f"SegmentConfig.prior must be in (0, 1) or None, got {self.prior}")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(f"SegmentConfig.decoder_channels must be 5 positive ints, got {self.decoder_channels}")
        for name in ("batch_size", "max_epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SegmentConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_params(cls, c: SegmentParams, dataset: str, pct: int, precision: str) -> SegmentConfig:
        """The config of one cell from ``finetune.seg``; ``pct`` is unused (the protocol's settings are the
        same at every fraction; the evaluators share this signature)."""
        if dataset not in c.batch_size:
            raise ValueError(f"finetune.seg.batch_size has no entry for {dataset!r} (has {sorted(c.batch_size)})")
        return cls(
            lr=c.lr, weight_decay=c.weight_decay, batch_size=c.batch_size[dataset], max_epochs=c.max_epochs,
            patience=c.patience, input_size=c.input_size, augment=c.augment,
            balance=c.balance and dataset == "siim",  # only SIIM is balanced in MGCA's protocol
            eval_batch_size=c.eval_batch_size, precision=precision, decoder_channels=tuple(c.decoder_channels),
            min_epoch_images=c.min_epoch_images, prior=c.prior,
        )  # fmt: skip


@dataclass(frozen=True)
class ShiftScaleRotate:
    """albumentations' ShiftScaleRotate as MGCA uses it for segmentation."""

    shift_limit: float = 0.0625  # fraction of the side
    scale_limit: float = 0.1  # scale uniform on [1 - limit, 1 + limit]
    rotate_limit: float = 10.0  # degrees
    p: float = 0.5


MGCA_SSR = ShiftScaleRotate()


# ------------------------------------------------------------------------------------------- model
def build_unet(
    trunk_state: dict[str, torch.Tensor], decoder_channels: tuple[int, ...] = DECODER_CHANNELS, prior: float | None = None
) -> nn.Module:
    """smp's ``Unet("resnet50", classes=1)`` whose encoder holds ``trunk_state`` exactly, frozen and in eval mode.

    ``prior``: where given, the head's bias starts at logit(prior), so that every pixel starts at that
    foreground probability (the detector's objectness prior, mflag.finetune.detect); None: smp's own init.

    ``trunk_state``: a state dict of :func:`mflag.models.resnet50_trunk` (``fc`` keys, if any, are
    ignored: the encoder has no classifier). Any other missing / unexpected key or shape mismatch raises.
    The decoder and head are initialised from the global RNG (seed it around the call).
    """
    model = smp.Unet(
        encoder_name="resnet50", encoder_weights=None, in_channels=3, classes=1, activation=None,
        decoder_channels=tuple(decoder_channels), decoder_attention_type=None,
    )  # fmt: skip
    enc = model.encoder
    state = {k: v for k, v in trunk_state.items() if not k.startswith("fc.")}  # a copy: smp's loader pops keys
    want = enc.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    bad_shape = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:  # checked here for one message naming all three
        raise ValueError(
            f"trunk state does not match the U-Net's ResNet-50 encoder: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(bad_shape)} with another shape {bad_shape[:4]}"
        )
    enc.load_state_dict(state, strict=True)
    if prior is not None:  # why: a decoder that starts at p = 0.5 marks half of every empty image for its first steps
        with torch.no_grad():
            model.segmentation_head[0].bias.fill_(math.log(prior / (1.0 - prior)))
    model.freeze_encoder()  # no gradients; model.train() now skips the encoder
    enc.eval()  # smp's freeze sets only the norm layers to eval; the whole encoder is inference-only here
    return model


# ----------------------------------------------------------------------------------- loss, metric
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Sigmoid focal loss without alpha, mean over every pixel: BCE * (1 - p_t) ** gamma."""
    x, t = logits.float(), target.float()
    bce = nnf.binary_cross_entropy_with_logits(x, t, reduction="none")
    # (1 - p_t) ** gamma = exp(gamma * logsigmoid(-x * (2t - 1))), stable for large |x|
    return (torch.exp(gamma * nnf.logsigmoid(-x * (2.0 * t - 1.0))) * bce).mean()


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice over the whole batch: (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), p = sigmoid."""
    p, t = torch.sigmoid(logits.float()).flatten(), target.float().flatten()
    return (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MGCA's MixedLoss: 10 * focal - log(soft Dice), in fp32 (also under autocast)."""
    with torch.autocast(logits.device.type, enabled=False):
        return FOCAL_WEIGHT * focal_loss(logits, target) - torch.log(soft_dice(logits, target))


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, H, W) 0/1 predictions and truths -> (N,) Dice; an empty truth scores 1 iff the prediction is empty."""
    pred = np.asarray(pred).astype(bool).reshape(len(pred), -1)
    truth = np.asarray(truth).astype(bool).reshape(len(truth), -1)
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ")
    inter = np.logical_and(pred, truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


# ------------------------------------------------------------------------------------------- data
def balanced_rows(rows: np.ndarray, masks_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every row with a non-empty mask plus as many (or all, if fewer) empty rows drawn without replacement."""
    rows = np.asarray(rows, dtype=np.int64)
    positive = np.array([bool(masks_u8[r].any()) for r in rows], dtype=bool)
    pos, neg = rows[positive], rows[~positive]
    keep = rng.choice(neg, size=min(len(pos), len(neg)), replace=False)
    return np.sort(np.concatenate([pos, keep]))


def _to_device(array: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 rows (in their given order) as one (n, S, S) tensor on the device; reads a memmap once."""
    order = np.argsort(rows, kind="stable")  # read the file front to back
    out = np.empty((len(rows),) + tuple(array.shape[1:]), dtype=np.uint8)
    out[order] = array[np.asarray(rows)[order]]
    return torch.from_numpy(out).to(device)


def _resize(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, S, S) pairs -> float32 (B, 1, size, size) grey levels [0, 255] and 0/1 masks."""
    x = images[:, None].float()
    m = masks[:, None].float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nnf.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        m = nnf.interpolate(m, size=(size, size), mode="nearest")
    return x, m


def shift_scale_rotate(
    images: torch.Tensor, masks: torch.Tensor, spec: ShiftScaleRotate, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched shift-scale-rotate of (B, 1, H, W) images and 0/1 masks with the same per-sample warp.

    Per sample (drawn on ``generator``, CPU): applied with prob p; angle uniform on +-rotate_limit degrees
    (counter-clockwise, cv2's convention), scale on 1 +- scale_limit, shift on +-shift_limit of the side.
    Reflection padding stands in for albumentations' default BORDER_REFLECT_101. One bilinear
    ``grid_sample`` warps image and mask together; the mask is thresholded at 0.5.
    """
    b, _, h, w = images.shape
    if h != w:  # a rotation in normalised coordinates is one in pixels only for square images
        raise ValueError(f"shift_scale_rotate expects square images, got {h}x{w}")
    u = torch.rand(b, 5, dtype=torch.float64, generator=generator)
    on = u[:, 0] < spec.p
    angle = torch.deg2rad((2.0 * u[:, 1] - 1.0) * spec.rotate_limit)
    scale = 1.0 + (2.0 * u[:, 2] - 1.0) * spec.scale_limit
    dx = (2.0 * u[:, 3] - 1.0) * spec.shift_limit
    dy = (2.0 * u[:, 4] - 1.0) * spec.shift_limit
    # Forward map in normalised coordinates (centre 0, y down): out = s R (in) + 2 d, with cv2's
    # R = [[cos, sin], [-sin, cos]]. grid_sample needs its inverse: in = R^T (out - 2 d) / s.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    tx, ty = 2.0 * dx, 2.0 * dy
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -(cos * tx - sin * ty)], -1),
            torch.stack([sin, cos, -(sin * tx + cos * ty)], -1),
        ],
        dim=1,
    )  # (B, 2, 3)
    theta = theta.to(images.device, torch.float32)
    grid = nnf.affine_grid(theta, [b, 2, h, w], align_corners=False)
    warped = nnf.grid_sample(torch.cat([images, masks], 1), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    on = on.to(images.device)[:, None, None, None]
    out_x = torch.where(on, warped[:, :1], images)  # untouched samples stay bit-exact
    out_m = torch.where(on, (warped[:, 1:] >= THRESHOLD).float(), masks)
    return out_x, out_m


def _normalise(x: torch.Tensor, cfg: SegmentConfig, channels_last: bool) -> torch.Tensor:
    """[0, 255] grey (B, 1, H, W) -> the encoder's input (B, 3, H, W), normalised with ``cfg.mean`` / ``cfg.std``."""
    x = normalise_grey(x, cfg.mean, cfg.std)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ------------------------------------------------------------------------------------------- loop
@torch.no_grad()
def _encode(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: SegmentConfig, channels_last: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen encoder's features of every image (bf16 under bf16) and the resized masks.

    Level 0 (the input itself, which the decoder reads only for its shape) is kept as a 0-channel tensor.
    """
    model.encoder.eval()
    amp = cfg.precision == "bf16"
    levels: list[list[torch.Tensor]] = []
    out_masks = []
    for i in range(0, len(images), cfg.eval_batch_size):
        x, m = _resize(images[i : i + cfg.eval_batch_size], masks[i : i + cfg.eval_batch_size], cfg.input_size)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model.encoder(_normalise(x, cfg, channels_last))
        feats = [feats[0][:, :0]] + [f.to(torch.bfloat16 if amp else torch.float32) for f in feats[1:]]
        levels = [[] for _ in feats] if not levels else levels
        for store, f in zip(levels, feats):
            store.append(f)
        out_masks.append(m)
    return [torch.cat(store) for store in levels], torch.cat(out_masks)


def _dice(logits: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per-image Dice of (B, 1, s, s) logits thresholded at 0.5 on the sigmoid."""
    return dice_per_image((torch.sigmoid(logits[:, 0]) > THRESHOLD).cpu().numpy(), masks[:, 0].cpu().numpy())


def _decoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


@torch.no_grad()
def segment_images(model: nn.Module, images_u8: np.ndarray, cfg: SegmentConfig) -> torch.Tensor:
    """Mask logits (N, 1, s, s) float32 (s = ``cfg.input_size``) of uint8 (N, S, S) images, as the evaluator
    predicts its test images: resized, normalised, ``model`` in eval mode, batches of ``cfg.eval_batch_size``,
    in ``cfg.precision``, on the model's device. A pixel is foreground where sigmoid(logit) > THRESHOLD."""
    model.eval()
    device = next(model.parameters()).device
    channels_last = cfg.precision == "bf16"
    amp = torch.bfloat16 if channels_last else None
    out = []
    for i in range(0, len(images_u8), cfg.eval_batch_size):
        u8 = torch.from_numpy(np.ascontiguousarray(images_u8[i : i + cfg.eval_batch_size])).to(device)
        x, _ = _resize(u8, u8, cfg.input_size)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out.append(model(_normalise(x, cfg, channels_last)).float())
    return torch.cat(out) if out else torch.zeros((0, 1, cfg.input_size, cfg.input_size), device=device)


def train_segmenter(
    trunk_state: dict[str, torch.Tensor],
    data: TaskData,
    cfg: SegmentConfig,
    device: torch.device | str,
    seed: int,
    log: Callable[[dict], None] | None = None,
    memo: FeatureMemo | None = None,
    return_head: bool = False,
) -> dict:
    """Fine-tune a U-Net decoder on a frozen encoder; test the epoch with the lowest validation loss.

    Reads ``data.images`` and ``data.masks`` ((N, S, S) uint8, masks 0/1, memory-mapped or not) at
    ``data.train_rows``, ``valid_rows`` and ``test_rows``. Returns ``{"dice", "best_epoch", "epochs_run",
    "n_train", "cases"}`` (epochs count from 1; ``n_train`` after balancing); ``cases``, the bootstrap evidence
    for :func:`mflag.stats.replicates`, is the (n_test,) float64 Dice of each test image in ``test_rows``
    order, whose mean is ``dice``. ``log`` receives one dict per epoch,
    with its ``"epoch"``. ``memo``, called as ``memo("valid" | "test", compute)``, may return a stored result
    of ``compute()`` (the frozen encoder's features and the resized masks of that split, which every
    fraction of a job shares) instead of calling it. ``return_head``: also ``head``, the state of the tested
    decoder and head (every key of the model but ``encoder.*``, on the CPU).
    """
    if data.masks is None:
        raise ValueError(f"train_segmenter: the {data.dataset} task data has no masks")
    images_u8, masks_u8 = data.images, data.masks
    device = torch.device(device)
    train_rows = np.asarray(data.train_rows, dtype=np.int64)
    valid_rows, test_rows = np.asarray(data.valid_rows), np.asarray(data.test_rows)
    if cfg.balance:
        train_rows = balanced_rows(train_rows, masks_u8, np.random.default_rng(seed))
    if len(train_rows) == 0 or len(valid_rows) == 0 or len(test_rows) == 0:
        raise ValueError(f"empty split: train {len(train_rows)}, valid {len(valid_rows)}, test {len(test_rows)}")

    with torch.random.fork_rng(devices=[]):  # decoder init from the seed, global RNG untouched
        torch.manual_seed(seed)
        model = build_unet(trunk_state, cfg.decoder_channels, cfg.prior)
    channels_last = cfg.precision == "bf16"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    gen = torch.Generator().manual_seed(seed)  # order and augmentation, on the CPU

    on_device = {
        name: (_to_device(images_u8, rows, device), _to_device(masks_u8, rows, device))
        for name, rows in (("train", train_rows), ("valid", valid_rows), ("test", test_rows))
    }

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(x)

    # Without augmentation the frozen encoder's input never changes: encode every image once, then train
    # and evaluate the decoder on the stored multi-scale features (the same numbers, minus repeated work).
    memo = memo or no_memo

    def encode(name: str):
        return _encode(model, *on_device[name], cfg, channels_last)

    # the train rows depend on the fraction: never stored; valid and test go through the memo
    cached = {} if cfg.augment else {
        name: (no_memo if name == "train" else memo)(name, lambda n=name: encode(n)) for name in on_device
    }

    def batch(split: str, idx: torch.Tensor | slice, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, 1, s, s), masks (B, 1, s, s)) of the rows `idx` of a split."""
        if split in cached:
            feats, masks = cached[split]
            with autocast():
                return model.segmentation_head(model.decoder([f[idx] for f in feats])), masks[idx]
        images, masks = on_device[split]
        x, m = _resize(images[idx], masks[idx], cfg.input_size)
        if augment:
            x, m = shift_scale_rotate(x, m, MGCA_SSR, gen)
        return forward(_normalise(x, cfg, channels_last)), m

    @torch.no_grad()
    def predict(split: str, batch_size: int):
        """(logits (B, 1, s, s), masks (B, 1, s, s)) batches of a split, in order."""
        model.eval()
        for i in range(0, len(on_device[split][0]), batch_size):
            logits, m = batch(split, slice(i, i + batch_size), False)
            yield logits.float(), m

    best = {"loss": math.inf, "epoch": 0, "state": _decoder_state(model)}
    epochs_run = 0
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        model.encoder.eval()  # frozen: batch-norm statistics stay those of the trunk
        n = len(on_device["train"][0])
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes_per_epoch(n, cfg.min_epoch_images))])
        order = order.to(device)
        loss_sum, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for i in range(0, len(order), cfg.batch_size):
            logits, m = batch("train", order[i : i + cfg.batch_size], cfg.augment)
            loss = segmentation_loss(logits, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(m)
            seen += len(m)
        train_loss = loss_sum.item() / seen  # sync point: the epoch's steps are done
        train_seconds = time.perf_counter() - t0

        # Validation loss per batch of batch_size (soft Dice is a batch quantity), weighted by batch size.
        v_loss, v_n, v_dice = 0.0, 0, []
        with torch.no_grad():
            for logits, m in predict("valid", cfg.batch_size):
                v_loss += segmentation_loss(logits, m).item() * len(m)
                v_n += len(m)
                v_dice.append(_dice(logits, m))
        v_loss /= v_n
        epochs_run = epoch
        if v_loss < best["loss"]:
            best = {"loss": v_loss, "epoch": epoch, "state": _decoder_state(model)}
        if log is not None:
            log({
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": v_loss,
                "valid_dice": float(np.concatenate(v_dice).mean()),
                "best_epoch": best["epoch"],
                "train_images_per_second": seen / train_seconds,
                "seconds": time.perf_counter() - t0,
            })
        if epoch - best["epoch"] >= cfg.patience:
            break

    # The best epoch's decoder and head; the encoder never changed.
    missing, unexpected = model.load_state_dict(best["state"], strict=False)
    assert not unexpected and all(k.startswith("encoder.") for k in missing), (missing, unexpected)
    test_dice = np.concatenate([_dice(logits, m) for logits, m in predict("test", cfg.eval_batch_size)])
    out = {
        "dice": float(test_dice.mean()),
        "best_epoch": best["epoch"],
        "epochs_run": epochs_run,
        "n_train": int(len(train_rows)),
        "cases": test_dice.astype(np.float64),
    }
    if return_head:
        out["head"] = {k: v.cpu() for k, v in best["state"].items()}
    return out

"""A fine-tune cell's trained head, kept (``models/finetune/<cell>/head.safetensors``), and the loader that rebuilds
the cell's whole model for inference.

The file holds what the cell trained and tested (the best-on-valid epoch, which every evaluator restores before
its test pass), keyed as in the model's state dict without the frozen encoder:

* ``cls``: ``probes.weight`` (P, K, D) and ``probes.bias`` (P, K), the cell's P linear probes (one per seed,
  ``seeds`` in the metadata), of :class:`mflag.finetune.classify.ProbeClassifier`;
* ``seg``: ``decoder.*`` and ``segmentation_head.*`` of the U-Net (:func:`mflag.finetune.segment.build_unet`);
* ``det``: ``head.*``, the YOLOv3 neck and output convolutions (:func:`mflag.finetune.detect.build_detector`).

The frozen encoder is not copied: the loader reads it from the encoder's own weights file, whose path and SHA-256
the metadata records (a file that has changed since is refused). The safetensors metadata is one entry,
``mflag_head``: a JSON object with sorted keys (safetensors writes several entries in an order that changes from
process to process, and identical runs must write identical bytes): ``format_version``, ``job``, ``task``,
``dataset``, ``pct``, ``encoder`` (name, kind, weights, sha256, key_prefix, mean, std), ``config`` (the
evaluator's config, all fields), ``model`` (what shapes the model, per task), ``seeds`` (cls: the probes' seeds)
or ``seed`` (seg, det). docs/contracts.md ("A cell's head"); usage: docs/heads.md.

    model = load_cell_model("models/finetune/cls_rsna-1-mflag/head.safetensors")
    logits = predict(model, images_u8)  # uint8 (N, S, S) images, as in data/cache/<dataset>/images.npy
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mflag.encoders import Encoder, EncoderError, load_encoder
from mflag.io import atomic_write, file_sha256

if TYPE_CHECKING:
    from mflag.jobs import Job

FORMAT_VERSION = 1
META_KEY = "mflag_head"
HEAD_FILE = "head.safetensors"
FROZEN = {"cls": "trunk.", "seg": "encoder.", "det": "trunk."}  # the frozen encoder's keys in each task's model

__all__ = ["Cell", "HeadError", "head_metadata", "save_head", "read_head", "load_cell_model", "predict"]


class HeadError(Exception):
    """A head file (or the encoder weights it needs) that cannot be loaded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """What :func:`load_cell_model` sets as ``model.cell``: the task, the evaluator's config the model runs with,
    the head file's metadata and its path."""

    task: str
    config: object
    meta: dict
    path: Path


# ------------------------------------------------------------------------------------------------ writing
def _label_names(dataset: str, kind: str) -> list[str]:
    from mflag.data import LABEL_COLUMNS
    from mflag.finetune.data import COVIDX_CLASSES

    return list(COVIDX_CLASSES) if kind == "multiclass" else list(LABEL_COLUMNS.get(dataset, ()))


def _model_spec(task: str, cfg, tensors: dict[str, torch.Tensor], dataset: str, kind: str) -> dict:
    """What shapes the task's model, beyond the config (read back as a check, and for a reader of the file)."""
    if task == "cls":
        p, k, d = tensors["probes.weight"].shape
        return {"kind": kind, "labels": _label_names(dataset, kind), "probes": p, "outputs": k, "features": d}
    if task == "seg":
        from mflag.finetune.segment import THRESHOLD

        return {"architecture": "smp.Unet(resnet50, classes=1)", "classes": 1, "input_size": cfg.input_size,
                "decoder_channels": list(cfg.decoder_channels), "threshold": THRESHOLD}  # fmt: skip
    from mflag.finetune.detect import ANCHORS_PER_SCALE, MAX_DETECTIONS, STRIDES, yolo_anchors

    return {"architecture": "YOLOv3 neck and head on ResNet-50 layer2-4", "classes": 1, "input_size": cfg.input_size,
            "neck_widths": list(cfg.widths), "strides": list(STRIDES), "anchors_per_scale": ANCHORS_PER_SCALE,
            "anchors": yolo_anchors(cfg.input_size).tolist(), "conf_threshold": cfg.conf_threshold,
            "nms_iou": cfg.nms_iou, "max_detections": MAX_DETECTIONS}  # fmt: skip


def head_metadata(job: Job, pct: int, enc: Encoder, encoder_sha256: str, cfg, tensors: dict[str, torch.Tensor],
                  seeds: list[int], kind: str = "") -> dict:  # fmt: skip
    """The metadata of one cell's head: `cfg` the evaluator's config it ran with, `tensors` the head (keys as the
    evaluator returns them), `seeds` the probes' seeds (cls) or the one training seed, `kind` the cls labels' kind."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    meta = {
        "format_version": FORMAT_VERSION, "job": job.name, "task": job.task, "dataset": job.dataset, "pct": int(pct),
        "encoder": {"name": enc.name, "kind": enc.kind, "weights": enc.path.as_posix(), "sha256": encoder_sha256,
                    "key_prefix": enc.key_prefix, "mean": list(enc.mean), "std": list(enc.std)},
        "config": config, "model": _model_spec(job.task, cfg, tensors, job.dataset, kind),
    }  # fmt: skip
    if job.task == "cls":
        meta["seeds"] = [int(s) for s in seeds]
    else:
        (meta["seed"],) = (int(s) for s in seeds)
    return meta


def _canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)


def save_head(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The head's tensors (CPU, contiguous) and `meta` as safetensors, atomically; identical inputs, identical bytes
    (safetensors orders the tensors itself; the metadata is one entry of sorted-key JSON). safetensors' ``save``
    (its ``save_file`` format, as bytes) so that mflag.io.atomic_write, the stages' one atomic write, writes it."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, save(state, metadata={META_KEY: _canonical(meta)}))


# ------------------------------------------------------------------------------------------------ reading
def read_head(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a head file; HeadError (naming the file) if it is missing, not a head file or of
    a format version this code does not read."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file not found: {path} (each finetune_<task>@<dataset>-<encoder> stage writes "
                        f"models/finetune/<job>-<pct>-<encoder>/{HEAD_FILE})")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise HeadError(f"{path}: not a safetensors file ({err})") from None
    if raw is None:
        raise HeadError(f"{path}: not a fine-tune head file (no {META_KEY!r} metadata entry)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise HeadError(f"{path}: the {META_KEY!r} metadata is not JSON ({err})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise HeadError(f"{path}: head format version {version!r}; this code reads version {FORMAT_VERSION}")
    return tensors, meta


def _encoder_weights(path: Path, meta: dict, given: str | Path | None) -> Path:
    """The encoder weights file to load: `given`, else the recorded path; a relative one is looked up first in the
    repository the head file sits in (<root>/models/finetune/<cell>/head.safetensors), then in the current folder."""
    if given is not None:
        candidates = [Path(given)]
    else:
        recorded = Path(meta["encoder"]["weights"])
        candidates = [recorded]
        here = path.resolve()
        if not recorded.is_absolute() and here.parent.parent.name == "finetune" and here.parents[2].name == "models":
            candidates.insert(0, here.parents[3] / recorded)
    for c in candidates:
        if c.is_file():
            return c
    raise HeadError(f"{path}: encoder weights file not found: {candidates[0]} (encoder {meta['encoder']['name']}, "
                    f"SHA-256 {meta['encoder']['sha256']}); pass encoder_weights= the file the head was trained on")  # fmt: skip


def _config(task: str, meta: dict, path: Path):
    from mflag.finetune.classify import ClassifyConfig
    from mflag.finetune.detect import DetectConfig
    from mflag.finetune.segment import SegmentConfig

    cls = {"cls": ClassifyConfig, "seg": SegmentConfig, "det": DetectConfig}[task]
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    except (TypeError, ValueError) as err:
        raise HeadError(f"{path}: its config does not fit this code's {cls.__name__} ({err})") from None


def _build(task: str, trunk_state: dict[str, torch.Tensor], cfg, model_spec: dict) -> nn.Module:
    """The task's model before its head is loaded, built by the evaluator's own builder."""
    with torch.random.fork_rng(devices=[]):  # the builders draw a throw-away init: the global RNG is left alone
        torch.manual_seed(0)
        if task == "cls":
            from mflag.finetune.classify import build_classifier

            return build_classifier(trunk_state, model_spec["probes"], model_spec["outputs"], cfg, model_spec["features"])
        if task == "seg":
            from mflag.finetune.segment import build_unet

            return build_unet(trunk_state, cfg.decoder_channels)
        from mflag.finetune.detect import build_detector

        return build_detector(trunk_state, 0, cfg.widths)


def _load_head(model: nn.Module, tensors: dict[str, torch.Tensor], frozen: str, path: Path) -> None:
    want = {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)}
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    bad_shape = sorted(k for k in set(want) & set(tensors) if tuple(want[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or bad_shape:
        raise HeadError(f"{path}: its tensors do not fit the model its metadata describes: {len(missing)} missing "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(bad_shape)} of another "
                        f"shape {bad_shape[:3]}")  # fmt: skip
    model.load_state_dict(tensors, strict=False)


def load_cell_model(head_path: str | Path, encoder_weights: str | Path | None = None, device: str | torch.device = "cpu",
                    precision: str | None = None) -> nn.Module:  # fmt: skip
    """A cell's whole model, in eval mode on `device`: the frozen encoder from its weights file (`encoder_weights`,
    else the path the metadata records; its SHA-256 must be the recorded one) and the head of `head_path`.

    The model is the evaluator's own: :class:`~mflag.finetune.classify.ProbeClassifier` (cls),
    smp's ``Unet`` (seg), :class:`~mflag.finetune.detect.YoloDetector` (det), with ``model.cell`` (:class:`Cell`:
    the task, the evaluator's config with ``precision`` replaced where given, else the one the cell ran with,
    the file's metadata and path). :func:`predict` runs the cell's evaluation path on uint8 images.
    Raises HeadError, naming the file, for a missing head or encoder file, a hash mismatch, an unknown format
    version, or tensors that do not fit."""
    path = Path(head_path)
    tensors, meta = read_head(path)
    task = meta.get("task")
    if task not in FROZEN:
        raise HeadError(f"{path}: unknown task {task!r} (one of {', '.join(FROZEN)})")
    weights = _encoder_weights(path, meta, encoder_weights)
    digest = file_sha256(weights)
    if digest != meta["encoder"]["sha256"]:
        raise HeadError(f"{path}: encoder weights {weights} have SHA-256 {digest}, but the head was trained on "
                        f"{meta['encoder']['sha256']} (encoder {meta['encoder']['name']}): not the same encoder")  # fmt: skip
    e = meta["encoder"]
    try:
        state = load_encoder(Encoder(e["name"], e["kind"], weights, e["key_prefix"], tuple(e["mean"]), tuple(e["std"])))
    except EncoderError as err:
        raise HeadError(f"{path}: {err}") from None
    cfg = _config(task, meta, path)
    if precision is not None:
        cfg = dataclasses.replace(cfg, precision=precision)
    model = _build(task, state, cfg, meta["model"])
    del state
    _load_head(model, tensors, FROZEN[task], path)
    model.to(torch.device(device)).eval()
    model.cell = Cell(task, cfg, meta, path)
    return model


@torch.no_grad()
def predict(model: nn.Module, images_u8: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """The cell's test-time outputs on uint8 (N, S, S) images (a cache's images.npy rows), by the evaluator's own
    functions, on the model's device:

    * cls: logits (P, N, K) float32 of the P probes (``model.cell.meta["seeds"]``); the cell's metric is the mean
      over probes of each probe's metric; ``.mean(0)`` is the probes' ensemble;
    * seg: mask logits (N, s, s) float32 at ``s = config.input_size``; foreground where sigmoid > 0.5;
    * det: per image an (n, 5) float32 array x1, y1, x2, y2, score in input pixels (``config.input_size``;
      times S / input_size for the cache's pixels), after the evaluator's decoding and NMS, best first.
    """
    cfg = model.cell.config
    if model.cell.task == "cls":
        return model.predict(images_u8)
    if model.cell.task == "seg":
        from mflag.finetune.segment import segment_images

        return segment_images(model, images_u8, cfg)[:, 0].cpu().numpy()
    from mflag.finetune.detect import encode_features, predict_features

    device = next(model.head.parameters()).device
    feats = encode_features(model, images_u8, np.arange(len(images_u8)), cfg, device)
    return predict_features(model.head, feats, cfg, device)

"""Stage `finetune@<job>-<pct>-<init>`: one downstream cell (job x data fraction x encoder init).

Reads the job's cache (data/cache/<dataset>) and an encoder (models/<init>/vision_encoder.safetensors),
runs the job's protocol (linear probe, U-Net segmentation or YOLOv3-style detection) and writes
reports/finetune/<job>-<pct>-<init>/metrics.json: the test metric(s), the best epoch, the number of
training images and the resolved params.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import mflag
from mflag.config import to_dict
from mflag.distributed import resolve_device, resolve_precision
from mflag.finetune.data import JOBS, load_task_data
from mflag.finetune.memo import FileMemo
from mflag.io import atomic_write, write_json
from mflag.live import StepLog
from mflag.models import load_trunk
from mflag.params import load_or_exit

INITS = ("mflag", "random", "imagenet")
# Timings are printed, never written: they would make the outputs (and dvc.lock) differ between identical runs.
TIMING = ("seconds", "feature_seconds", "train_images_per_second")
# Frozen-encoder features shared between the cells of a job (outside DVC: a cache, never a result).
FEATURES = Path(".cache/features")
# The code that computes them: a change to any of these files gives new keys.
_LIB = Path(mflag.__file__).parent
FEATURE_CODE = (_LIB / "models.py", _LIB / "resnet.py", *sorted((_LIB / "finetune").glob("*.py")))


def _feature_key(settings: str, encoder: Path, dataset: str) -> str:
    """16 hex digits of a hash of everything the stored features depend on: the settings string, the
    encoder's weights, the dataset's cache (images, masks, rows), the feature code and the torch version."""
    h = hashlib.sha256(f"{settings}/torch {torch.__version__}".encode())
    cache = Path("data/cache") / dataset
    for path in (encoder, *sorted(p for p in cache.iterdir() if p.is_file()), *FEATURE_CODE):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _split_memo(job: str, init: str, cfg, encoder: Path, dataset: str, device) -> FileMemo:
    """The store of a segmentation or detection job's valid and test features, shared by its three fractions;
    a newer key replaces the job and init's older files."""
    key = _feature_key(f"{job}/{cfg.input_size}/{cfg.eval_batch_size}/{cfg.precision}", encoder, dataset)
    return FileMemo(FEATURES, f"{job}-{init}-{key}", device, replaces=f"{job}-{init}-*")


def _encoder_path(init: str) -> Path:
    path = Path("models") / init / "vision_encoder.safetensors"
    if not path.is_file():
        hint = {
            "imagenet": "the imagenet init needs torchvision's ImageNet ResNet-50 converted to "
            "models/imagenet/vision_encoder.safetensors (not shipped; see README, 'Encoder inits')",
            "mflag": "run the pretrain stage first (dvc repro pretrain)",
            "random": "run the init_random stage first (dvc repro init_random)",
        }[init]
        sys.exit(f"error: finetune: encoder file not found: {path}; {hint}")
    return path


def main(job: str, pct: int, init: str) -> None:
    params = load_or_exit()
    ft = params.finetune
    task, dataset = JOBS[job]
    device = resolve_device(ft.device)
    precision = resolve_precision(ft.precision, torch.device(device), "finetune.precision")
    encoder = _encoder_path(init)
    data = load_task_data(Path("data/cache") / dataset, dataset, task, pct)
    for name, rows in (("train", data.train_rows), ("valid", data.valid_rows), ("test", data.test_rows)):
        if len(rows) == 0:
            at = f" at {pct}%" if name == "train" else ""
            sys.exit(f"error: finetune {job}: no {name} rows{at} in data/cache/{dataset}/index.csv "
                     f"(see data.{dataset}.valid_fraction / test_fraction and data/splits/{dataset}.csv)")
    cell = f"{job}-{pct}-{init}"
    out = Path("reports/finetune") / cell
    seed = params.seed
    log_rows: list[dict] = []
    live = StepLog(out / "live")

    def log(rec: dict) -> None:
        for k, v in rec.items():
            if k != "epoch" and k not in TIMING and isinstance(v, (int, float)):
                live.log_metric(k, float(v))
        live.next_step()
        log_rows.append(rec)

    if task == "cls":
        from mflag.finetune.classify import ClassifyConfig, encode_features, probe_over_seeds

        c = ft.cls
        cfg = ClassifyConfig.from_params(c, dataset, precision)
        trunk = load_trunk(encoder).to(device)
        features = None
        if not c.augment:
            # frozen encoder, deterministic crops: the three fractions share one feature file
            key = _feature_key(f"{dataset}/{c.crop}/{c.upsample}/{c.eval_batch_size}/{precision}", encoder, dataset)
            cache = FEATURES / f"{dataset}-{init}-{key}.npy"
            if cache.is_file():
                features = np.load(cache)
            else:
                features = encode_features(trunk, data.images, np.arange(len(data.index)), cfg, device)
                buf = io.BytesIO()
                np.save(buf, features)
                atomic_write(cache, buf.getvalue())
        result = probe_over_seeds(trunk, data.images, data.labels, data.train_rows, data.valid_rows, data.test_rows,
                                  data.kind, cfg, device, [seed + k for k in range(c.seeds)], features=features,
                                  log=log)  # fmt: skip
        task_params = to_dict(c)
    elif task == "seg":
        from mflag.finetune.segment import SegmentConfig, train_segmenter

        c = ft.seg
        cfg = SegmentConfig(
            lr=c.lr, weight_decay=c.weight_decay, batch_size=c.batch_size[dataset], max_epochs=c.max_epochs,
            patience=c.patience, input_size=c.input_size, augment=c.augment, balance=c.balance and dataset == "siim",
            eval_batch_size=c.eval_batch_size, precision=precision, decoder_channels=tuple(c.decoder_channels),
        )  # fmt: skip
        memo = None if c.augment else _split_memo(job, init, cfg, encoder, dataset, device)
        result = train_segmenter(load_file(str(encoder)), data.images, data.masks, data.train_rows, data.valid_rows,
                                 data.test_rows, cfg, device, seed, log=log, memo=memo)  # fmt: skip
        task_params = to_dict(c)
    else:
        from mflag.finetune.detect import DetectConfig, train_detector

        c = ft.det
        by_pct = c.lr[dataset][f"pct{pct}"], c.batch_size[dataset][f"pct{pct}"]
        cfg = DetectConfig(
            lr=by_pct[0], weight_decay=c.weight_decay, batch_size=by_pct[1], max_epochs=c.max_epochs,
            patience=c.patience, input_size=c.input_size, conf_threshold=c.conf_threshold, nms_iou=c.nms_iou,
            iou_thresholds=tuple(c.iou_thresholds), drop_empty_test=c.drop_empty_test,
            eval_batch_size=c.eval_batch_size, precision=precision,
        )  # fmt: skip
        result = train_detector(load_file(str(encoder)), data.images, data.boxes, data.train_rows, data.valid_rows,
                                data.test_rows, cfg, device, seed, log=log, widths=tuple(c.neck_widths),
                                memo=_split_memo(job, init, cfg, encoder, dataset, device))  # fmt: skip
        task_params = to_dict(c)
    live.end()
    timing = {k: result.pop(k) for k in TIMING if k in result}
    write_json(out / "metrics.json", {
        "job": job, "pct": pct, "init": init, **result,
        "params": {"seed": seed, "finetune": {task: task_params, "device": ft.device, "precision": ft.precision},
                   "precision_used": precision},
    })  # fmt: skip
    if timing:
        print(f"finetune {cell} timing: " + ", ".join(f"{k}={v:.1f}" for k, v in timing.items()))
    print(f"finetune {cell}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in JOBS or sys.argv[2] not in ("1", "10", "100") or sys.argv[3] not in INITS:
        sys.exit(f"usage: python stages/finetune.py <job> <pct> <init>; job one of {', '.join(JOBS)}, "
                 f"pct 1, 10 or 100, init one of {', '.join(INITS)}")  # fmt: skip
    try:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    except ValueError as err:  # the evaluators' own checks (empty or too small a split, bad config)
        sys.exit(f"error: finetune {'-'.join(sys.argv[1:4])}: {err}")

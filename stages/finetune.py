"""Stage `finetune@<job>-<init>`: one job's cells (data fractions 1, 10, 100 %) from one encoder init.

Reads the job's cache (data/cache/<dataset>) and the encoder (models/<init>/vision_encoder.safetensors),
builds the evaluator's config from `finetune.<task>` for each fraction, runs the job's protocol (linear probe,
U-Net segmentation or YOLOv3-style detection) and writes each cell's reports/finetune/<job>-<pct>-<init>/:
metrics.json (the test metric(s), the best epoch, the number of training images, the resolved params) and
the per-epoch curves in live/. A subset with a single class stops the cell or makes its metric null with a
reason (mflag.finetune.checks; docs/contracts.md, "Metrics"). The fractions share this process, so the frozen
encoder's features that do not depend on the fraction are computed once (mflag.finetune.memo).

    python stages/finetune.py <job> <init> [<pct> ...]     (all of 1, 10, 100 by default)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from mflag.config import to_dict
from mflag.distributed import resolve_device, resolve_precision
from mflag.finetune.checks import SubsetError, cell_record, check_subsets
from mflag.finetune.data import TaskData, load_task_data
from mflag.finetune.memo import MemoryMemo
from mflag.io import open_live, rounded, write_json
from mflag.jobs import ALL_INITS, JOBS, PCTS, Job, cell_name
from mflag.models import load_trunk
from mflag.params import load_or_exit

# Timings are printed, never written: they would make the outputs (and dvc.lock) differ between identical runs.
TIMING = ("seconds", "feature_seconds", "train_images_per_second")
USAGE = (f"usage: python stages/finetune.py <job> <init> [<pct> ...]; job one of {', '.join(JOBS)}, "
         f"init one of {', '.join(ALL_INITS)}, pct among {', '.join(map(str, PCTS))} (default: all)")  # fmt: skip

Run = Callable[[object, TaskData, Callable[[dict], None]], dict]  # (config, data of one fraction, log) -> result


def _encoder_path(init: str) -> Path:
    path = Path("models") / init / "vision_encoder.safetensors"
    if not path.is_file():
        hint = {
            "imagenet": "the imagenet init needs torchvision's ImageNet ResNet-50 converted to "
            "models/imagenet/vision_encoder.safetensors (not shipped; see docs/design.md, 'Encoder inits')",
            "mflag": "run the pretrain stage first (dvc repro pretrain)",
            "random": "run the init_random stage first (dvc repro init_random)",
        }[init]
        sys.exit(f"error: finetune: encoder file not found: {path}; {hint}")
    return path


def _evaluator(task: str, encoder: Path, device: str, seed: int, probes: int) -> tuple[type, Run]:
    """The task's config class and a function that runs one fraction; state shared between the fractions
    (the frozen encoder, its features) lives in the closure."""
    if task == "cls":
        from mflag.finetune.classify import ClassifyConfig, encode_features, probe_over_seeds

        trunk = load_trunk(encoder).to(device)
        stored: dict[str, np.ndarray] = {}

        def run(cfg, data, log):
            if not cfg.augment and "all" not in stored:  # deterministic crops: one pass serves every fraction
                stored["all"] = encode_features(trunk, data.images, np.arange(len(data.index)), cfg, device)
            return probe_over_seeds(trunk, data, cfg, device, [seed + k for k in range(probes)],
                                    features=stored.get("all"), log=log)  # fmt: skip

        return ClassifyConfig, run
    state = load_file(str(encoder))
    memo = MemoryMemo()  # valid and test features, the same for every fraction
    if task == "seg":
        from mflag.finetune.segment import SegmentConfig, train_segmenter

        return SegmentConfig, lambda cfg, data, log: train_segmenter(
            state, data, cfg, device, seed, log=log, memo=None if cfg.augment else memo)  # fmt: skip
    from mflag.finetune.detect import DetectConfig, train_detector

    return DetectConfig, lambda cfg, data, log: train_detector(state, data, cfg, device, seed, log=log, memo=memo)


def _check_rows(job: Job, data: TaskData, pct: int) -> None:
    for name, rows in (("train", data.train_rows), ("valid", data.valid_rows), ("test", data.test_rows)):
        if len(rows) == 0:
            at = f" at {pct}%" if name == "train" else ""
            sys.exit(f"error: finetune {job.name}: no {name} rows{at} in data/cache/{job.dataset}/index.csv "
                     f"(see data.{job.dataset}.valid_fraction / test_fraction and data/splits/{job.dataset}.csv)")


def _progress(cell: str, rec: dict) -> str:
    values = ", ".join(f"{k}={v:.4f}" for k, v in rec.items() if k != "epoch" and isinstance(v, float))
    return f"finetune {cell} epoch {rec.get('epoch', '?')}: {values}"


def main(job: Job, init: str, pcts: list[int]) -> None:
    params = load_or_exit()
    ft = params.finetune
    device = resolve_device(ft.device)
    precision = resolve_precision(ft.precision, torch.device(device), "finetune.precision")
    encoder = _encoder_path(init)
    data = load_task_data(Path("data/cache") / job.dataset, job.dataset, job.task)
    task_params = getattr(ft, job.task)
    config_class, run = _evaluator(job.task, encoder, device, params.seed, ft.cls.seeds)
    for pct in pcts:
        cell = cell_name(job.name, pct, init)
        out = Path("reports/finetune") / cell
        fraction = data.at_fraction(pct)
        _check_rows(job, fraction, pct)
        try:
            check = check_subsets(fraction, job.task, pct)
        except SubsetError as err:
            sys.exit(f"error: finetune {cell}: {err}")
        for warning in check.warnings:
            print(f"warning: finetune {cell}: {warning}", file=sys.stderr)
        cfg = config_class.from_params(task_params, job.dataset, pct, precision)
        live = open_live(out / "live")

        def log(rec: dict) -> None:
            for k, v in rec.items():
                # an undefined value (a valid AUC on one class) is left out: DVCLive would write a NaN token
                if k != "epoch" and k not in TIMING and isinstance(v, (int, float)) and math.isfinite(v):
                    live.log_metric(k, rounded(float(v)))
            live.next_step()
            print(_progress(cell, rec), flush=True)  # progress: a paper-scale cell trains for an hour

        result = run(cfg, fraction, log)
        live.end()
        timing = {k: result.pop(k) for k in TIMING if k in result}
        record = cell_record(result, job.metric, check.not_evaluable)
        if "not_evaluable" in record:
            print(f"warning: finetune {cell}: {job.metric} not evaluable, written as null: {record['not_evaluable']}",
                  file=sys.stderr)  # fmt: skip
        write_json(out / "metrics.json", {
            "job": job.name, "pct": pct, "init": init, **record,
            "params": {"seed": params.seed,
                       "finetune": {job.task: to_dict(task_params), "device": ft.device, "precision": ft.precision},
                       "precision_used": precision},
        })  # fmt: skip
        if timing:
            print(f"finetune {cell} timing: " + ", ".join(f"{k}={v:.1f}" for k, v in timing.items()))
        shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in record.items()
                 if isinstance(v, float) or (k == job.metric and v is None)}  # fmt: skip
        print(f"finetune {cell}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _parse(argv: list[str]) -> tuple[Job, str, list[int]]:
    if len(argv) < 2 or argv[0] not in JOBS or argv[1] not in ALL_INITS or not all(a in map(str, PCTS) for a in argv[2:]):
        sys.exit(USAGE)
    return JOBS[argv[0]], argv[1], [int(a) for a in argv[2:]] or list(PCTS)


if __name__ == "__main__":
    job, init, pcts = _parse(sys.argv[1:])
    try:
        main(job, init, pcts)
    except ValueError as err:  # the evaluators' own checks (empty or too small a split, bad config)
        sys.exit(f"error: finetune {job.name}-{init}: {err}")

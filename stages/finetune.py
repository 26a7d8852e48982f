"""Stage `finetune_<task>@<dataset>-<encoder>`: one job's cells (data fractions 1, 10, 100 %) from one encoder.

Reads the job's cache (data/cache/<dataset>) and the encoder `encoders.<encoder>` of params.yaml (its weights
under models/<encoder>/, mflag.encoders), builds the evaluator's config from `finetune.<task>` for each
fraction, runs the job's protocol (linear probe, U-Net segmentation or YOLOv3-style detection) and writes each
cell's reports/finetune/<job>-<pct>-<encoder>/: metrics.json (the test metric(s), the best epoch, the number
of training and test images, the resolved params), bootstrap.csv (the test metric on each of `stats.resamples`
resamples of the test cases, drawn from `seed` and the job's name: the same resamples for every encoder, so
collation can pair them) and the per-epoch curves in live/; and the trained head its test metric came from,
models/finetune/<job>-<pct>-<encoder>/head.safetensors (mflag.finetune.heads, whose load_cell_model rebuilds the
cell's model from it). A subset with a single class stops the cell or makes its metric null with a reason
(mflag.finetune.checks; docs/contracts.md, "Metrics"). The fractions share this process, so the frozen
encoder's features that do not depend on the fraction are computed once (mflag.finetune.memo).

    python stages/finetune.py <job> <encoder> [<pct> ...]     (all of 1, 10, 100 by default)
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mflag.config import to_dict
from mflag.distributed import resolve_device, resolve_precision
from mflag.finetune.checks import SubsetError, cell_record, check_subsets, trivial_score
from mflag.finetune.data import TaskData, load_task_data, fingerprint_test_set
from mflag.finetune.heads import HEAD_FILE, head_metadata, save_head
from mflag.finetune.memo import MemoryMemo
from mflag.encoders import Encoder, EncoderError, encoder, load_encoder
from mflag.io import atomic_write, file_sha256, open_live, rounded, write_json
from mflag.jobs import JOBS, PCTS, Job, cell_name
from mflag.models import resnet50_trunk
from mflag.params import load_or_exit
from mflag.stats import replicates, resample_indices

# Timings are printed, never written: they would make the outputs (and dvc.lock) differ between identical runs.
TIMING = ("seconds", "feature_seconds", "train_images_per_second")
USAGE = (f"usage: python stages/finetune.py <job> <encoder> [<pct> ...]; job one of {', '.join(JOBS)}, "
         f"encoder one of those under `encoders` in params.yaml, pct among {', '.join(map(str, PCTS))} (default: all)")  # fmt: skip

Run = Callable[[object, TaskData, Callable[[dict], None]], dict]  # (config, data of one fraction, log) -> result


def _evaluator(task: str, state: dict, device: str, seed: int, probes: int) -> tuple[type, Run]:
    """The task's config class and a function that runs one fraction; state shared between the fractions
    (the frozen encoder, its features) lives in the closure."""
    if task == "cls":
        from mflag.finetune.classify import ClassifyConfig, encode_features, probe_over_seeds

        trunk = resnet50_trunk()
        trunk.load_state_dict(state)
        trunk.to(device)
        stored: dict[str, np.ndarray] = {}

        def run(cfg, data, log):
            if not cfg.augment and "all" not in stored:  # deterministic crops: one pass serves every fraction
                stored["all"] = encode_features(trunk, data.images, np.arange(len(data.index)), cfg, device)
            return probe_over_seeds(trunk, data, cfg, device, [seed + k for k in range(probes)],
                                    features=stored.get("all"), log=log, return_head=True)  # fmt: skip

        return ClassifyConfig, run
    memo = MemoryMemo()  # valid and test features, the same for every fraction
    if task == "seg":
        from mflag.finetune.segment import SegmentConfig, train_segmenter

        return SegmentConfig, lambda cfg, data, log: train_segmenter(
            state, data, cfg, device, seed, log=log, memo=None if cfg.augment else memo, return_head=True)  # fmt: skip
    from mflag.finetune.detect import DetectConfig, train_detector

    return DetectConfig, lambda cfg, data, log: train_detector(state, data, cfg, device, seed, log=log, memo=memo,
                                                                return_head=True)  # fmt: skip


def _check_rows(job: Job, data: TaskData, pct: int) -> None:
    for name, rows in (("train", data.train_rows), ("valid", data.valid_rows), ("test", data.test_rows)):
        if len(rows) == 0:
            at = f" at {pct}%" if name == "train" else ""
            sys.exit(f"error: finetune {job.name}: no {name} rows{at} in data/cache/{job.dataset}/index.csv "
                     f"(see data.{job.dataset}.valid_fraction / test_fraction and data/splits/{job.dataset}.csv)")


def _progress(cell: str, rec: dict) -> str:
    values = ", ".join(f"{k}={v:.4f}" for k, v in rec.items() if k != "epoch" and isinstance(v, float))
    return f"finetune {cell} epoch {rec.get('epoch', '?')}: {values}"


def _bootstrap_csv(metric: str, reps: np.ndarray) -> str:
    """One line per resample; an empty field where the metric is undefined on it (e.g. one class drawn)."""
    return f"{metric}\n" + "".join(("" if not math.isfinite(v) else repr(rounded(float(v)))) + "\n" for v in reps)


def main(job: Job, name: str, pcts: list[int]) -> None:
    params = load_or_exit()
    ft = params.finetune
    if name not in params.encoders:
        sys.exit(f"error: finetune: no encoder `{name}` under `encoders` in params.yaml (listed: "
                 f"{', '.join(params.encoders)})")  # fmt: skip
    enc: Encoder = encoder(name, params.encoders[name])
    device = resolve_device(ft.device)
    precision = resolve_precision(ft.precision, torch.device(device), "finetune.precision")
    try:
        state = load_encoder(enc)
    except EncoderError as err:
        sys.exit(f"error: finetune {job.name}-{name}: {err}")
    encoder_sha256 = file_sha256(enc.path)  # recorded with each head: its loader checks the encoder is the same
    data = load_task_data(Path("data/cache") / job.dataset, job.dataset, job.task)
    task_params = getattr(ft, job.task)
    config_class, run = _evaluator(job.task, state, device, params.seed, ft.cls.seeds)
    del state
    # the same resamples for every encoder and fraction of this job: drawn from the seed and the job's name
    resamples = resample_indices(len(data.test_rows), params.stats.resamples, params.seed, job.name)
    for pct in pcts:
        cell = cell_name(job.name, pct, name)
        out = Path("reports/finetune") / cell
        fraction = data.at_fraction(pct)
        _check_rows(job, fraction, pct)
        try:
            check = check_subsets(fraction, job.task, pct)
        except SubsetError as err:
            sys.exit(f"error: finetune {cell}: {err}")
        for warning in check.warnings:
            print(f"warning: finetune {cell}: {warning}", file=sys.stderr)
        cfg = dataclasses.replace(config_class.from_params(task_params, job.dataset, pct, precision),
                                  mean=enc.mean, std=enc.std)  # the normalisation the encoder was trained with
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
        head = result.pop("head")
        reps = replicates(result.pop("cases"), resamples)
        record = cell_record(result, job.metric, check.not_evaluable)
        if "not_evaluable" in record:
            print(f"warning: finetune {cell}: {job.metric} not evaluable, written as null: {record['not_evaluable']}",
                  file=sys.stderr)  # fmt: skip
        if record.get(job.metric) is None:
            reps = np.full(len(reps), np.nan)  # a metric not evaluable has no interval either
        atomic_write(out / "bootstrap.csv", _bootstrap_csv(job.metric, reps))
        seeds = result["seeds"] if job.task == "cls" else [params.seed]
        meta = head_metadata(job, pct, enc, encoder_sha256, cfg, head, seeds, fraction.kind)
        save_head(Path("models/finetune") / cell / HEAD_FILE, head, meta)  # the weights the test metric came from
        write_json(out / "metrics.json", {
            "job": job.name, "pct": pct, "encoder": name, **record,
            "trivial": rounded(trivial_score(fraction, job.task)),  # what a model that learned nothing scores
            "test_cases": int(len(fraction.test_rows)), "test_set": fingerprint_test_set(fraction),
            "bootstrap": {"resamples": params.stats.resamples, "seed": params.seed, "key": job.name},
            "params": {"seed": params.seed, "encoder": to_dict(params.encoders[name]),
                       "finetune": {job.task: to_dict(task_params), "device": ft.device, "precision": ft.precision},
                       "precision_used": precision},
        })  # fmt: skip
        if timing:
            print(f"finetune {cell} timing: " + ", ".join(f"{k}={v:.1f}" for k, v in timing.items()))
        shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in record.items()
                 if isinstance(v, float) or (k == job.metric and v is None)}  # fmt: skip
        print(f"finetune {cell}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _parse(argv: list[str]) -> tuple[Job, str, list[int]]:
    if len(argv) < 2 or argv[0] not in JOBS or not all(a in map(str, PCTS) for a in argv[2:]):
        sys.exit(USAGE)
    return JOBS[argv[0]], argv[1], [int(a) for a in argv[2:]] or list(PCTS)


if __name__ == "__main__":
    job, name, pcts = _parse(sys.argv[1:])
    try:
        main(job, name, pcts)
    except ValueError as err:  # the evaluators' own checks (empty or too small a split, bad config)
        sys.exit(f"error: finetune {job.name}-{name}: {err}")

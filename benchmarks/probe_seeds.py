"""Seconds the classification cells spend training their probes: the seeds' heads trained together
(`probe_over_seeds`, what the cells run) against one `linear_probe` after another (what it replaced).

Reads the encoders under models/ and the caches under data/cache (run `dvc repro` first, or at least the
pretrain, init_random and cache stages) and the demo params (finetune.cls, seed). Each encoder's frozen
features are computed once, as the stage does, and are not timed, so the figures are the probes alone.
Each cell's mean AUC / accuracy is printed for both ways, as a check that they agree.
Run:  python benchmarks/probe_seeds.py [--seeds N] [--jobs cls_chexpert cls_rsna cls_covidx]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mflag.finetune.classify import ClassifyConfig, encode_features, linear_probe, probe_over_seeds  # noqa: E402
from mflag.finetune.data import load_task_data  # noqa: E402
from mflag.encoders import encoder as encoder_of  # noqa: E402
from mflag.jobs import JOBS, PCTS  # noqa: E402
from mflag.models import load_trunk  # noqa: E402
from mflag.params import load_or_exit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=None, help="probes per cell (default: finetune.cls.seeds)")
    ap.add_argument("--jobs", nargs="+", default=["cls_chexpert", "cls_rsna", "cls_covidx"])
    args = ap.parse_args()
    params = load_or_exit()
    c = params.finetune.cls
    n_seeds = args.seeds or c.seeds
    seeds = [params.seed + k for k in range(n_seeds)]
    totals = {"together": 0.0, "one by one": 0.0}
    print(f"{n_seeds} seeds per cell, {torch.get_num_threads()} threads")
    print(f"{'cell':<24}{'n_train':>8}{'together s':>12}{'one by one s':>14}{'metric together':>17}{'one by one':>12}")
    for name in args.jobs:
        job = JOBS[name]
        if job.task != "cls":
            sys.exit(f"error: {name} is a {job.task} job; this benchmark times the classification probes")
        dataset = job.dataset
        data_all = load_task_data(Path("data/cache") / dataset, dataset, "cls")
        for init, spec in params.encoders.items():
            if spec.kind not in ("mflag", "convirt", "random"):
                continue  # the encoders trained here; a user's file goes through stages/finetune.py
            encoder = encoder_of(init, spec).path
            if not encoder.is_file():
                sys.exit(f"error: no encoder {encoder}: run `dvc repro` first")
            features = None
            for pct in PCTS:
                cfg = replace(ClassifyConfig.from_params(c, dataset, pct, "fp32"), augment=False, moco_aug=False)
                data = data_all.at_fraction(pct)
                if features is None:  # all rows, shared by the fractions as in the stage
                    features = encode_features(load_trunk(encoder), data.images, np.arange(len(data.images)), cfg,
                                               "cpu", progress=False)  # fmt: skip
                t0 = time.perf_counter()
                got = probe_over_seeds(None, data, cfg, "cpu", seeds, features=features, progress=False)
                t1 = time.perf_counter()
                single = [linear_probe(None, data, cfg, "cpu", s, features=features, progress=False) for s in seeds]
                t2 = time.perf_counter()
                metric = job.metric
                ref = float(np.mean([r[metric] for r in single]))
                totals["together"] += t1 - t0
                totals["one by one"] += t2 - t1
                print(f"{name}-{pct}-{init:<10}{len(data.train_rows):>8}{t1 - t0:>12.2f}{t2 - t1:>14.2f}"
                      f"{got[metric]:>17.4f}{ref:>12.4f}")  # fmt: skip
    together, apart = totals["together"], totals["one by one"]
    print(f"total: together {together:.1f} s, one by one {apart:.1f} s ({apart / together:.1f}x)")


if __name__ == "__main__":
    main()

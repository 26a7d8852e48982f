"""Seconds the classification cells spend training their probes: the seeds' heads trained together
(`probe_over_seeds`, what the cells run) against one `linear_probe` after another (what it replaced).

Reads the features the cells stored under .cache/features (run `dvc repro` first, or at least the
classification cells) and the demo params (finetune.cls, seed); the frozen encoder is not run, so the
figures are the probes alone. Each cell's mean AUC / accuracy is printed for both ways, as a check that
they agree.
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

from mflag.finetune.classify import ClassifyConfig, linear_probe, probe_over_seeds  # noqa: E402
from mflag.finetune.data import JOBS, load_task_data  # noqa: E402
from mflag.params import load_or_exit  # noqa: E402

FEATURES = Path(".cache/features")


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
    for job in args.jobs:
        _, dataset = JOBS[job]
        cfg = replace(ClassifyConfig.from_params(c, dataset, "fp32"), augment=False, moco_aug=False)
        for init in ("mflag", "random"):
            stored = sorted(FEATURES.glob(f"{dataset}-{init}-*.npy"), key=lambda p: p.stat().st_mtime)
            if not stored:
                sys.exit(f"error: no stored features {FEATURES}/{dataset}-{init}-*.npy: run `dvc repro` first")
            features = np.load(stored[-1])
            for pct in (1, 10, 100):
                data = load_task_data(Path("data/cache") / dataset, dataset, "cls", pct)
                rows = (data.train_rows, data.valid_rows, data.test_rows)
                t0 = time.perf_counter()
                got = probe_over_seeds(None, None, data.labels, *rows, data.kind, cfg, "cpu", seeds,
                                       features=features, progress=False)  # fmt: skip
                t1 = time.perf_counter()
                single = [linear_probe(None, None, data.labels, *rows, data.kind, cfg, "cpu", s, features=features,
                                       progress=False) for s in seeds]  # fmt: skip
                t2 = time.perf_counter()
                metric = "acc" if data.kind == "multiclass" else "auc"
                ref = float(np.mean([r[metric] for r in single]))
                totals["together"] += t1 - t0
                totals["one by one"] += t2 - t1
                print(f"{job}-{pct}-{init:<10}{len(data.train_rows):>8}{t1 - t0:>12.2f}{t2 - t1:>14.2f}"
                      f"{got[metric]:>17.4f}{ref:>12.4f}")  # fmt: skip
    together, apart = totals["together"], totals["one by one"]
    print(f"total: together {together:.1f} s, one by one {apart:.1f} s ({apart / together:.1f}x)")


if __name__ == "__main__":
    main()

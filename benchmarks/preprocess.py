"""Images per second of each dataset's preprocess (decode + resize + pad + write) on the default corpus.

Run after `dvc repro` has built the splits:  python benchmarks/preprocess.py [--workers N]
It reads data.<dataset>.root and data/splits/<dataset>.csv as the stage does and writes the cache to a
temporary folder, so the pipeline's own outputs are not touched.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mflag.data import reader
from mflag.data.cache import build_cache
from mflag.data.split import read_split_csv
from mflag.params import DATASETS, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: data.workers)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load(args.params)
    workers = args.workers or params.data.workers
    print(f"cpu cores: {os.cpu_count()}, workers: {workers}, image_size: {params.data.image_size}")
    print(f"{'dataset':10s} {'images':>7s} {'seconds':>8s} {'img/s':>8s}")
    for ds in DATASETS:
        root = Path(getattr(params.data, ds).root)
        split = read_split_csv(Path("data/splits") / f"{ds}.csv")
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            table = reader(ds)(root)
            summary = build_cache(
                table, split, root, Path(tmp) / "cache", params.data.image_size, workers,
                params.data.max_skip_fraction, ds, Path(tmp) / "quality.json",
            )  # fmt: skip
            seconds = time.perf_counter() - start
        n = summary["kept"]
        print(f"{ds:10s} {n:7d} {seconds:8.2f} {n / seconds:8.1f}")


if __name__ == "__main__":
    main()

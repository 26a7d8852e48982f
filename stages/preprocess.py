"""Stage `preprocess@<dataset>`: decode every image of the split into the uint8 cache."""

from __future__ import annotations

import sys
from pathlib import Path

from mflag.data import reader
from mflag.data.cache import build_cache
from mflag.data.split import read_split_csv
from mflag.data.table import DataError, read_dropped_csv
from mflag.params import DATASETS, load_or_exit


def main(dataset: str) -> None:
    params = load_or_exit()
    root = Path(getattr(params.data, dataset).root)
    splits = Path("data/splits")
    try:
        table = reader(dataset)(root)
        summary = build_cache(
            table,
            read_split_csv(splits / f"{dataset}.csv"),
            root=root,
            out_dir=Path("data/cache") / dataset,
            image_size=params.data.image_size,
            workers=params.data.workers,
            max_skip_fraction=params.data.max_skip_fraction,
            dataset=dataset,
            quality_path=Path("reports/data_quality") / f"{dataset}.json",
            split_dropped=read_dropped_csv(splits / f"{dataset}.dropped.csv"),
        )
    except DataError as err:
        sys.exit(f"error: preprocess {dataset}: {err}")
    print(f"preprocess {dataset}: {summary}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in DATASETS:
        sys.exit(f"usage: python stages/preprocess.py <dataset>, dataset one of {', '.join(DATASETS)}")
    main(sys.argv[1])

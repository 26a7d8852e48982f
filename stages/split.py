"""Stage `split@<dataset>`: read a dataset's official layout and write its patient-level split file."""

from __future__ import annotations

import sys
from pathlib import Path

from mflag.data import LABEL_COLUMNS, reader
from mflag.data.split import SplitSpec, assign_splits, check_splits_not_empty, write_split_csv
from mflag.data.table import DataError, write_dropped_csv
from mflag.params import DATASETS, load_or_exit


def main(dataset: str) -> None:
    params = load_or_exit()
    cfg = getattr(params.data, dataset)
    try:
        table = reader(dataset)(Path(cfg.root))
        spec = SplitSpec(cfg.valid_fraction, cfg.test_fraction, label_columns=LABEL_COLUMNS[dataset])
        split, dropped = assign_splits(table.rows, spec, params.seed)
        check_splits_not_empty(split, table, dropped, spec, dataset)
    except DataError as err:
        sys.exit(f"error: split {dataset}: {err}")
    out = Path("data/splits")
    write_split_csv(split, out / f"{dataset}.csv")
    write_dropped_csv(list(table.dropped) + list(dropped), out / f"{dataset}.dropped.csv")
    counts = split["split"].value_counts().to_dict()
    train = split[split["split"] == "train"]
    sizes = {f"pct{p}": int((train["pct"] <= p).sum()) for p in spec.fractions}
    print(f"split {dataset}: {counts}, train subsets {sizes}, dropped {len(table.dropped) + len(dropped)}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in DATASETS:
        sys.exit(f"usage: python stages/split.py <dataset>, dataset one of {', '.join(DATASETS)}")
    main(sys.argv[1])

"""Stage `split@<dataset>`: read a dataset's official layout and write its split file: the pipeline's own
patient-level split, or MGCA's (data.<dataset>.split_source: mgca, files in data/mgca_splits/<dataset>/), with the
record of what produced it (data/splits/<dataset>.source.json)."""

from __future__ import annotations

import sys
from pathlib import Path

from mflag.data import LABEL_COLUMNS, reader
from mflag.data.mgca import MGCA_ROOT, assign_from_mgca, own_record, stray_files, write_source_record
from mflag.data.split import SplitSpec, assign_splits, check_splits_not_empty, write_split_csv
from mflag.data.table import DataError, write_dropped_csv
from mflag.params import DATASETS, load_or_exit


def main(dataset: str) -> None:
    params = load_or_exit()
    cfg = getattr(params.data, dataset)
    spec = SplitSpec(cfg.valid_fraction, cfg.test_fraction, label_columns=LABEL_COLUMNS[dataset])
    folder = MGCA_ROOT / dataset
    try:
        table = reader(dataset)(Path(cfg.root))
        if cfg.split_source == "mgca":
            split, dropped, record = assign_from_mgca(dataset, table, folder, root=cfg.root)
        else:
            split, dropped = assign_splits(table.rows, spec, params.seed)
            check_splits_not_empty(split, table, dropped, spec, dataset)
            record = own_record(dataset, params.seed, cfg.valid_fraction, cfg.test_fraction)
    except DataError as err:
        sys.exit(f"error: split {dataset}: {err}")
    out = Path("data/splits")
    write_split_csv(split, out / f"{dataset}.csv")
    write_dropped_csv(list(table.dropped) + list(dropped), out / f"{dataset}.dropped.csv")
    write_source_record(record, out / f"{dataset}.source.json")
    counts = split["split"].value_counts().to_dict()
    train = split[split["split"] == "train"]
    sizes = {f"pct{p}": int((train["pct"] <= p).sum()) for p in spec.fractions}
    print(f"split {dataset}: {counts}, train subsets {sizes}, dropped {len(table.dropped) + len(dropped)}"
          f"{', from MGCA files in ' + folder.as_posix() + '/' if cfg.split_source == 'mgca' else ''}")  # fmt: skip
    if cfg.split_source == "mgca":
        for reason, n in record["not_used"].items():
            print(f"split {dataset}: MGCA files: {reason}: {n}")
        if not record["subsets"]["as_mgca"]:
            print(f"warning: split {dataset}: train/valid/test are MGCA's, but MGCA draws this dataset's 1 %/10 % "
                  "subsets from NumPy's global RNG, which cannot be recomputed: they follow MGCA's classification "
                  "rule instead (docs/design.md, \"MGCA split files\")", file=sys.stderr)  # fmt: skip
        for p, n in sizes.items():
            if n == 0:
                print(f"warning: split {dataset}: the {p[3:]} % train subset is empty (MGCA's sample of "
                      f"{record['subsets']['sampled_from']} rows rounds to none): its cells cannot train",
                      file=sys.stderr)  # fmt: skip
    elif stray := stray_files(dataset, folder):
        print(f"note: split {dataset}: {folder}/ holds MGCA files ({', '.join(stray)}), "
              f"unused: data.{dataset}.split_source is own")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in DATASETS:
        sys.exit(f"usage: python stages/split.py <dataset>, dataset one of {', '.join(DATASETS)}")
    main(sys.argv[1])

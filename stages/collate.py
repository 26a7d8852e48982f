"""Stage `collate`: every fine-tuning cell and the pretraining run into reports/ (see mflag/collate.py).

Reads reports/finetune/<job>-<pct>-<init>/metrics.json (a missing cell is a warning and a dash in the
tables; a metric written as null, not evaluable, a warning and n/a; a NaN token ends the stage with the
file's name), reports/pretrain/{metrics.json,losses.csv,spectrum.csv} and references/paper_reference.yaml
(a missing one ends the stage with its name). Writes reports/metrics.json, reports/tables/,
reports/plots/ and reports/claims.md. Reads no params.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mflag.collate import (
    CollateError,
    missing_cells,
    read_cells,
    read_columns,
    read_not_evaluable,
    read_pretrain,
    read_reference,
    read_spreads,
    write_reports,
)
from mflag.jobs import cell_name

FINETUNE = Path("reports/finetune")
PRETRAIN = Path("reports/pretrain")
REFERENCE = Path("references/paper_reference.yaml")
OUT = Path("reports")


def main() -> None:
    for path in (PRETRAIN / "metrics.json", PRETRAIN / "losses.csv", PRETRAIN / "spectrum.csv", REFERENCE):
        if not path.is_file():
            hint = "it is tracked in Git" if path == REFERENCE else "run the pretrain stage first (dvc repro pretrain)"
            sys.exit(f"error: collate: input file not found: {path}; {hint}")
    try:
        cells = read_cells(FINETUNE)
        spreads = read_spreads(FINETUNE)
        reasons = read_not_evaluable(FINETUNE)
        pretrain = read_pretrain(PRETRAIN / "metrics.json")
        losses, spectrum = read_columns(PRETRAIN / "losses.csv"), read_columns(PRETRAIN / "spectrum.csv")
        reference = read_reference(REFERENCE)
    except CollateError as err:
        sys.exit(f"error: collate: {err}")
    missing = missing_cells(cells)
    if missing:
        print(f"warning: collate: {len(missing)} fine-tuning cells not found under {FINETUNE}/ (dashes in the "
              f"tables): {', '.join(missing)}", file=sys.stderr)  # fmt: skip
    if reasons:
        listed = "; ".join(f"{cell_name(*k)} ({why})" for k, why in sorted(reasons.items()))
        print(f"warning: collate: {len(reasons)} fine-tuning cells not evaluable (n/a in the tables): {listed}",
              file=sys.stderr)  # fmt: skip
    write_reports(cells, pretrain, losses, spectrum, reference, OUT, spreads, reasons)
    print(f"collate: {len(cells)} cells, tables in {OUT}/tables, plots in {OUT}/plots, claims in {OUT}/claims.md")


if __name__ == "__main__":
    main()

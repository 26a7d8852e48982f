"""Stage `collate`: every fine-tuning cell and both pretraining runs into reports/ (see mflag/collate.py).

Reads the `encoders` (which cells make up the study, in which order) and `stats.level` of params.yaml, the cells
reports/finetune/<job>-<pct>-<encoder>/{metrics.json,bootstrap.csv} (a missing cell is a warning and a dash in
the tables; a metric written as null, not evaluable, a warning and n/a; a NaN token ends the stage with the
file's name), reports/pretrain/ and reports/pretrain_convirt/ {metrics.json,losses.csv,spectrum.csv,timing.json},
references/paper_reference.yaml and configs/paper.yaml (a missing one ends the stage with its name). Writes
reports/metrics.json, reports/tables/, reports/plots/ and reports/claims.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mflag.collate import (
    CollateError,
    paper_parameter_counts,
    read_columns,
    read_language_model,
    read_pretrain,
    read_reference,
    read_study,
    write_reports,
)
from mflag.encoders import encoder
from mflag.jobs import cell_name
from mflag.params import ParamsError, load, load_or_exit

FINETUNE = Path("reports/finetune")
RUNS = ("pretrain", "pretrain_convirt")  # reports/<run>/: M-FLAG and the ConVIRT-style baseline
REFERENCE = Path("references/paper_reference.yaml")
PAPER = Path("configs/paper.yaml")
OUT = Path("reports")


def main() -> None:
    params = load_or_exit()
    needed = [Path("reports") / run / f for run in RUNS for f in ("metrics.json", "losses.csv", "spectrum.csv",
                                                                  "timing.json")] + [REFERENCE, PAPER]  # fmt: skip
    for path in needed:
        if not path.is_file():
            hint = ("it is tracked in Git" if path in (REFERENCE, PAPER)
                    else f"run the {path.parent.name} stage first (dvc repro {path.parent.name})")  # fmt: skip
            sys.exit(f"error: collate: input file not found: {path}; {hint}")
    labels = {name: encoder(name, spec).label for name, spec in params.encoders.items()}
    try:
        study = read_study(FINETUNE, labels, params.stats.level)
        runs = {run: read_pretrain(Path("reports") / run / "metrics.json") for run in RUNS}
        losses = {run: read_columns(Path("reports") / run / "losses.csv") for run in RUNS}
        spectra = {run: read_columns(Path("reports") / run / "spectrum.csv") for run in RUNS}
        timings = {run: json.loads((Path("reports") / run / "timing.json").read_text()) for run in RUNS}
        references, lm = read_reference(REFERENCE), read_language_model(REFERENCE)
    except CollateError as err:
        sys.exit(f"error: collate: {err}")
    try:
        paper = paper_parameter_counts(load(PAPER), lm)
    except ParamsError as err:
        sys.exit(f"error: collate: {PAPER}: {err}")
    missing = study.missing()
    if missing:
        print(f"warning: collate: {len(missing)} fine-tuning cells not found under {FINETUNE}/ (dashes in the "
              f"tables): {', '.join(missing)}", file=sys.stderr)  # fmt: skip
    if study.reasons:
        listed = "; ".join(f"{cell_name(*k)} ({why})" for k, why in sorted(study.reasons.items()))
        print(f"warning: collate: {len(study.reasons)} fine-tuning cells not evaluable (n/a in the tables): {listed}",
              file=sys.stderr)  # fmt: skip
    write_reports(study, runs, losses, spectra, references, timings, paper, lm, OUT)
    print(f"collate: {len(study.cells)} cells of {len(labels)} encoders, tables in {OUT}/tables, plots in "
          f"{OUT}/plots, claims in {OUT}/claims.md")  # fmt: skip


if __name__ == "__main__":
    main()

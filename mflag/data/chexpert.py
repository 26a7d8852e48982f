"""CheXpert v1.0 (small or full): ``root`` contains ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``.

``train.csv`` is the official train split, ``valid.csv`` the test set (docs/contracts.md). Only frontal
images are kept. Labels use the U-Ones policy for Atelectasis, Edema and Pleural Effusion and
U-Zeros for Cardiomegaly and Consolidation; a blank label is 0.
"""

from __future__ import annotations

import re
from pathlib import Path

from .table import (
    BAD_LABEL,
    DUPLICATE_ROW,
    DataError,
    DatasetTable,
    drop_if_outside,
    line_of,
    make_table,
    read_csv_strings,
)

DIR_NAMES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_AS = {
    "Atelectasis": 1,
    "Cardiomegaly": 0,
    "Consolidation": 0,
    "Edema": 1,
    "Pleural Effusion": 1,
}
FILES = (("train.csv", "train"), ("valid.csv", "test"))
_PATIENT_RE = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


def find_dataset_dir(root: Path) -> Path:
    for name in DIR_NAMES:
        d = Path(root) / name
        if d.is_dir():
            return d
    raise DataError(
        f"{root}: contains neither {DIR_NAMES[0]}/ nor {DIR_NAMES[1]}/ (data.chexpert.root must be "
        "the folder that contains the unpacked CheXpert folder)"
    )


def parse_label(value: str, column: str) -> int | None:
    """0/1 under the contract's uncertainty policy; None for a value that is not a label."""
    v = value.strip()
    if v == "":
        return 0
    try:
        f = float(v)
    except ValueError:
        return None
    if f == 1.0:
        return 1
    if f == 0.0:
        return 0
    if f == -1.0:
        return UNCERTAIN_AS[column]
    return None


def _normalise_path(value: str, dir_name: str) -> str:
    p = value.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    # Some re-packaged copies list paths relative to the CheXpert folder itself.
    if p.startswith(("train/", "valid/", "test/")):
        p = f"{dir_name}/{p}"
    return p


def read_chexpert(root: Path) -> DatasetTable:
    root = Path(root)
    ddir = find_dataset_dir(root)
    required = ["Path", "Frontal/Lateral", *LABELS]
    records: list[dict] = []
    dropped: list[tuple[str, str]] = []
    excluded = {"lateral": 0, "other_view": 0}
    seen: set[str] = set()
    for fname, split in FILES:
        csv_path = ddir / fname
        df = read_csv_strings(csv_path, required)
        label_cols = [df[c].tolist() for c in LABELS]
        for i, (raw_path, view) in enumerate(zip(df["Path"], df["Frontal/Lateral"])):
            path = _normalise_path(raw_path, ddir.name)
            if not path:
                raise DataError(f"{csv_path}: line {line_of(i)}: empty Path")
            if drop_if_outside(root, path, dropped):
                continue
            v = view.strip().lower()
            if v != "frontal":
                excluded["lateral" if v == "lateral" else "other_view"] += 1
                continue
            m = _PATIENT_RE.search(path)
            if m is None:
                raise DataError(
                    f"{csv_path}: line {line_of(i)}: no patientNNNNN folder in Path {raw_path!r}"
                )
            if path in seen:
                dropped.append((path, DUPLICATE_ROW))
                continue
            labels = {}
            for c, values in zip(LABELS, label_cols):
                labels[c] = parse_label(values[i], c)
            if any(x is None for x in labels.values()):
                dropped.append((path, BAD_LABEL))
                continue
            seen.add(path)
            records.append(
                {
                    "image_id": path,
                    "patient_id": m.group(1),
                    "path": path,
                    "official_split": split,
                    **labels,
                }
            )
    return make_table(
        records,
        LABELS,
        int_labels=LABELS,
        source=str(ddir),
        dropped=dropped,
        excluded=excluded,
        sources={split: ddir / fname for fname, split in FILES},
    )
